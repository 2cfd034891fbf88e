"""Scale-out on CPU processes over gloo, as on GPUs: FSDP2 (LoRA and full fine-tuning) and DDP across two
"machines" follow the one-process curve with the same global batch; FSDP checkpoints resume and merge.

(DDP on one machine is the two-machine test with both processes on one host: torchrun, the same gloo group.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART, ROOT
from test_train_e2e import cli, kill_when_written, largest_difference, records

pytestmark = pytest.mark.slow

FSDP_CPU = str(ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml")
STEPS = 4
CURVE = [f"training.max_steps={STEPS}", "training.eval_strategy=no", "training.logging_steps=1",
         "training.train_sampling_strategy=sequential",  # the same pairs in each global batch
         "training.dataloader_num_workers=0"]
FULL = ["lora.method=full", "training.learning_rate=1e-4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two cores


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r and "train_runtime" not in r]


def assert_resumed_like_straight(straight: Path, resumed: Path, weights: str) -> None:
    """final/ of a resumed run equals the uninterrupted run's, to a twentieth of one optimizer step (as
    test_train_e2e's resume test: reloading may change the order of CPU sums; a wrong resume moves a whole step)."""
    load = lambda run, name: load_file(str(run / name / weights))  # noqa: E731
    one_step = largest_difference(load(straight, "final"), load(straight, "checkpoint-2")) / 2
    assert one_step > 1e-5, "the run must train, or the comparison proves nothing"
    assert largest_difference(load(straight, "final"), load(resumed, "final")) < 0.05 * one_step


def assert_same_curve(expected: list[float], got: list[float]) -> None:
    assert len(expected) == len(got) == STEPS
    for x, y in zip(expected, got):
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (expected, got)


@pytest.fixture(scope="module")
def one_process(asset_cache, tmp_path_factory):
    """The 1-process loss curve with batch 8, LoRA or full fine-tuning (each trained once, when first asked)."""
    curves = {}

    def curve(method: str) -> list[float]:
        if method not in curves:
            run = tmp_path_factory.mktemp(f"one-{method}") / "run"
            cli("train", "--config", QUICKSTART, f"training.output_dir={run}", "training.save_strategy=no",
                "training.per_device_train_batch_size=8", *CURVE, *(FULL if method == "full" else []), env=ENV)
            curves[method] = losses(run)
        return curves[method]

    return curve


def train_command(launcher: list[str], run: Path, *extra: str) -> list[str]:
    return [*launcher, "-m", "vlm_orpo.cli", "train", "--config", QUICKSTART, f"training.output_dir={run}",
            "training.per_device_train_batch_size=4", *CURVE, *extra]


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]


def accelerate_fsdp(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU,
            "--main_process_port", str(port)]


def launch(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fsdp_lora_follows_one_process_and_resumes_after_sigkill_and_merges(one_process, asset_cache, tmp_path):
    """`accelerate launch` with the FSDP2 CPU config: sharded checkpoints, full adapters in checkpoints and final/."""
    checkpoints = ["training.save_strategy=steps", "training.save_steps=2", "training.save_total_limit=null"]
    straight = tmp_path / "straight"
    result = launch(train_command(accelerate_fsdp(29534), straight, *checkpoints))
    assert "forward: packed shared prefix" in result.stdout  # the 4D mask and logits_to_keep went through FSDP
    assert_same_curve(one_process("lora"), losses(straight))
    shards = sorted(p.name for p in (straight / "checkpoint-2" / "pytorch_model_fsdp_0").iterdir())
    assert any(name.startswith("__0_") for name in shards) and any(name.startswith("__1_") for name in shards)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(accelerate_fsdp(29535), killed, *checkpoints), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when_written(proc, killed / "checkpoint-2")  # the launcher and both workers
    assert not (killed / "final").exists(), "the kill must land mid-training"
    launch(train_command(accelerate_fsdp(29536), killed, *checkpoints, "--resume"))

    assert_resumed_like_straight(straight, killed, "adapter_model.safetensors")
    assert [r["step"] for r in records(killed) if "loss" in r and "train_runtime" not in r] == [1, 2, 3, 4]

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.deploy.merge import merge_adapter

    merged = merge_adapter(straight / "final", tmp_path / "merged")
    expected = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"]),
                                         str(straight / "final")).merge_and_unload().state_dict()
    got = AutoModelForImageTextToText.from_pretrained(merged).state_dict()
    base = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"]).state_dict()
    assert got.keys() == expected.keys()
    assert any(not torch.equal(got[k], base[k]) for k in got), "the merged model carries the adapter"
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)


def test_fsdp_full_fine_tuning_follows_one_process_and_resumes(one_process, tmp_path):
    """`training.fsdp: true` under torchrun: full weights sharded, resumed from sharded model and optimizer."""
    fsdp = ["training.fsdp=true", "training.fsdp_config={state_dict_type: SHARDED_STATE_DICT}", *FULL,
            "training.save_strategy=steps", "training.save_steps=2", "training.save_total_limit=null"]
    straight = tmp_path / "straight"
    launch(train_command(torchrun(29537), straight, *fsdp))
    assert_same_curve(one_process("full"), losses(straight))
    assert len(load_file(str(straight / "final" / "model.safetensors"))) > 50, "final/ holds the whole model"

    resumed = tmp_path / "resumed"  # as a kill right after checkpoint-2 leaves the run
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "final"))
    launch(train_command(torchrun(29538), resumed, *fsdp, "--resume"))
    assert_resumed_like_straight(straight, resumed, "model.safetensors")
    assert_same_curve(one_process("full"), losses(resumed))


def test_two_machines_follow_one_process(one_process, tmp_path):
    """DDP across two "machines" (accelerate's multi-node launch, one process each, over 127.0.0.1)."""
    run = tmp_path / "nodes"

    def machine(rank: int) -> list[str]:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                    "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", "29539", "--mixed_precision", "no", "--dynamo_backend", "no"]
        return train_command(launcher, run, "training.save_strategy=no")

    second = subprocess.Popen(machine(1), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        launch(machine(0))
        _, err = second.communicate(timeout=300)
    finally:
        second.kill()
    assert second.returncode == 0, err[-3000:]
    assert_same_curve(one_process("lora"), losses(run))


def test_a_stream_gives_each_process_its_part_and_resumes_each(tmp_path):
    """`data.streaming` under torchrun: each process reads its own part of the stream (none waits for the other),
    writes its position into every checkpoint, and resumes from it."""
    streamed = ["data.streaming=true", "data.eval_limit=8", "training.save_strategy=steps", "training.save_steps=2",
                "training.save_total_limit=null", "training.eval_strategy=no"]
    run = tmp_path / "streamed"
    result = launch(train_command(torchrun(29540), run, *streamed))
    assert f"train {2 * 4 * STEPS} (streamed:" in result.stdout  # both processes' pairs, counted on process 0
    for rank in (0, 1):
        assert (run / "checkpoint-2" / f"stream_state-rank{rank}.json").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(train_command(torchrun(29541), resumed, *streamed, "--resume"))
    assert f"train {2 * 4 * STEPS} (streamed:" in result.stdout
    assert_resumed_like_straight(run, resumed, "adapter_model.safetensors")
