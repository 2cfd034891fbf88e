"""End-to-end `vlm-orpo train` on the bundled tiny model: the quickstart, resume after SIGKILL, run safety.

Several processes (DDP, FSDP, two machines): test_scale_out.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART, run_cli

pytestmark = pytest.mark.slow


def cli(*args, env=None, check=True, timeout=900, cwd=None):
    result = run_cli(*args, env=env, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"vlm-orpo {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_improves_and_saves_loadable_adapters(quickstart_run, asset_cache):
    run, stdout = quickstart_run
    evals = [r for r in records(run) if "eval_rewards/accuracies" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] <= 0.7  # base: about chance
    assert len({r["step"] for r in evals}) == len(evals), "each step is evaluated once, the last one included"
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "| base (step 0) |" in stdout and "| final (step" in stdout
    summary = (run / "summary.md").read_text()
    assert "ORPO loss (λ = 1)" in summary and "best (step" in summary
    for plot in ("orpo_loss.png", "sft_loss.png", "or_loss.png", "preference_accuracy.png"):
        assert (run / plot).stat().st_size > 1000
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "final" / "README.md")  # ours, not PEFT's empty template
    assert "vlm-orpo" in card.data.tags and "ORPO loss (λ = 1)" in card.text
    assert "[More Information Needed]" not in card.text and "| base (step 0) |" in card.text
    train_logs = [r for r in records(run) if "rewards/accuracies" in r]
    assert train_logs and all("pairs_per_s" in r and "log_odds_chosen" in r for r in train_logs)

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    for name in ("best", "final"):
        assert (run / name / "adapter_config.json").exists()
        base = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"])
        before = {k: v.clone() for k, v in base.state_dict().items() if "multi_modal_projector" in k}
        tuned = PeftModel.from_pretrained(base, str(run / name))
        lora = [n for n, _ in tuned.named_parameters() if "lora_B" in n]
        assert lora, "the adapter must hold LoRA weights"
        assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
        saved = load_file(str(run / name / "adapter_model.safetensors"))
        projector = {k.split("multi_modal_projector.")[1]: v for k, v in saved.items() if "multi_modal_projector." in k}
        base_projector = {k.split("multi_modal_projector.")[1]: v for k, v in before.items()}
        assert projector and projector.keys() <= base_projector.keys(), "train_projector saves it with the adapter"
        assert any(not torch.equal(v, base_projector[k]) for k, v in projector.items()), "the projector trained"


def small_run_args(run: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", QUICKSTART, f"training.output_dir={run}", "training.max_steps=12",
        "training.save_steps=4", "training.eval_strategy=no", "training.logging_steps=1",
        "training.per_device_train_batch_size=4", "training.save_total_limit=null", *extra,
    ]


def adapter(run: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "adapter_model.safetensors"))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def kill_when_written(proc: subprocess.Popen, path: Path) -> None:
    """SIGKILL `proc` (its whole process group when it leads one: a launcher and its workers) once `path` exists."""
    deadline = time.time() + 600
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.1)
    if os.getpgid(proc.pid) == proc.pid:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_matches_uninterrupted_run(asset_cache, tmp_path):
    env = dict(os.environ)
    straight = tmp_path / "straight"
    cli(*small_run_args(straight), env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_orpo.cli", *small_run_args(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kill_when_written(proc, killed / "checkpoint-8")
    assert not (killed / "final").exists(), "the kill must land mid-training"
    for checkpoint in killed.glob("checkpoint-*"):  # renamed into place only when complete
        assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()

    cli(*small_run_args(killed), "--resume", env=env)
    # Bitwise equality is not promised: a reloaded model sits at other addresses, and CPU BLAS kernels may
    # sum in another order (seen: 1.8e-6 on one of 2048 weights). A wrong resume (a step lost or repeated,
    # Adam's moments reset, another data order) moves weights by about one optimizer step, so the
    # tolerance is a twentieth of the mean step measured on this very run.
    one_step = largest_difference(adapter(straight, "checkpoint-12"), adapter(straight, "checkpoint-8")) / 4
    assert one_step > 1e-4, "the run must train, or the comparison proves nothing"
    assert largest_difference(adapter(straight), adapter(killed)) < 0.05 * one_step
    steps = [r["step"] for r in records(killed) if "loss" in r and "train_runtime" not in r]
    assert steps == sorted(set(steps)) == list(range(1, 13)), "metrics.jsonl must hold each step once"

    # Killed while final/ was written (it is staged, then renamed): resume gives the final/ it would have had,
    # without training past max_steps.
    expected = adapter(straight)
    shutil.rmtree(straight / "final")
    (straight / ".final.tmp").mkdir()
    cli(*small_run_args(straight), "--resume", env=env)
    assert largest_difference(adapter(straight), expected) < 0.05 * one_step
    assert json.loads((straight / "final" / "run.json").read_text()) == {"step": 12}
    assert not (straight / ".final.tmp").exists()


def test_a_torn_last_metrics_line_is_dropped_but_a_torn_middle_is_an_error(tmp_path):
    from vlm_orpo.reporting import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # the writer was killed mid-line
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(asset_cache, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-64").mkdir(parents=True)  # left by an earlier run
    args = ["train", "--config", QUICKSTART, f"training.output_dir={run}", "training.max_steps=2",
            "training.eval_strategy=no", "training.save_strategy=no"]
    refused = cli(*args, env=dict(os.environ), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "checkpoint-64" in refused.stderr and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    cli(*args, "--overwrite", env=dict(os.environ))
    assert not (run / "checkpoint-64").exists() and (run / "final" / "adapter_config.json").exists()


def test_load_best_model_at_end_finds_its_checkpoint_after_the_staging_rename(asset_cache, tmp_path):
    run = tmp_path / "run"
    cli("train", "--config", QUICKSTART, f"training.output_dir={run}", "training.max_steps=8",
        "training.eval_steps=4", "training.save_steps=4", "training.save_total_limit=1",
        "training.load_best_model_at_end=true", "training.metric_for_best_model=loss", env=dict(os.environ))
    [last] = list(run.glob("checkpoint-*"))
    best = json.loads((last / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert ".staging" not in best and Path(best).parent == run and Path(best).is_dir()
    assert (run / "final" / "adapter_config.json").exists() and (run / "summary.md").exists()


def test_resume_without_checkpoint_is_a_clear_error(asset_cache, tmp_path):
    result = cli(*small_run_args(tmp_path / "empty"), "--resume", env=dict(os.environ), check=False)
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_gradient_checkpointing_gives_the_same_training_curve(asset_cache, tmp_path):
    common = ["training.max_steps=3", "training.eval_strategy=no", "training.logging_steps=1",
              "training.save_strategy=no", "training.per_device_train_batch_size=4"]
    runs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        cli("train", "--config", QUICKSTART, f"training.output_dir={run}", f"training.gradient_checkpointing={flag}",
            *common, env=dict(os.environ))
        runs[flag] = [r["loss"] for r in records(run) if "loss" in r and "train_runtime" not in r]
    assert len(runs["true"]) == 3
    for plain, checkpointed in zip(runs["false"], runs["true"]):
        assert abs(plain - checkpointed) <= 1e-4 * abs(plain)


def train_in_process(capsys, *args):
    from test_cli import main_in_process

    return main_in_process(capsys, "train", "--config", QUICKSTART, *args)


def test_an_output_dir_that_cannot_be_written_is_one_line_before_loading(tmp_path, capsys):
    from test_cli import assert_one_line_error

    (tmp_path / "file").write_text("")
    for out, needle in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "is a file")):
        result = train_in_process(capsys, f"training.output_dir={out}")
        assert_one_line_error(result, f"output_dir {out}", needle)
        assert "Loading weights" not in result.stderr + result.stdout  # refused before the model loads


def test_a_second_run_into_a_locked_output_dir_is_refused(tmp_path, capsys):
    from test_cli import assert_one_line_error
    from vlm_orpo.run_dir import RunDir

    holder = RunDir(tmp_path / "run")
    holder.lock()  # as a running `vlm-orpo train` holds it
    try:
        result = train_in_process(capsys, f"training.output_dir={tmp_path / 'run'}")
        assert_one_line_error(result, "is in use by another run", f"pid {os.getpid()}")
    finally:
        holder.unlock()
    again = RunDir(tmp_path / "run")
    again.lock()  # released with its holder (the kernel drops a killed process's lock the same way)
    again.unlock()


def test_resuming_a_finished_run_is_a_no_op(quickstart_run, capsys):
    run, _ = quickstart_run
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    result = train_in_process(capsys, f"training.output_dir={run}", "--resume")
    assert result.returncode == 0 and "finished at step 64: nothing to resume" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


def test_a_diverging_run_stops_at_the_step_and_keeps_only_finite_weights(asset_cache, tmp_path):
    run = tmp_path / "run"
    result = cli(*small_run_args(run, "training.learning_rate=1000", "training.save_steps=1"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "became NaN/inf at step" in line and "learning_rate 1000" in line
    assert not (run / "final").exists()
    checkpoints = list(run.glob("checkpoint-*"))
    assert checkpoints and all(finite(adapter(run, c.name)) for c in checkpoints)
    stopped_at = int(line.split("at step ")[1].split()[0])
    assert max(int(c.name.split("-")[1]) for c in checkpoints) == stopped_at - 1


def test_ctrl_c_stops_in_one_line_that_says_how_to_resume(asset_cache, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_orpo.cli", *small_run_args(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoint-4").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before Ctrl-C"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "stopped by Ctrl-C at step" in line and "checkpoint-" in line and "--resume" in line


def test_a_full_disk_is_one_line_naming_the_directory_and_what_was_kept(asset_cache, tmp_path, capsys, monkeypatch):
    import errno

    from vlm_orpo.trainer import PreferenceTrainer

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".staging"))

    monkeypatch.setattr(PreferenceTrainer, "_save_checkpoint", full)
    result = train_in_process(capsys, *small_run_args(tmp_path / "run")[3:], "training.max_steps=4")
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"no space left on the device of {tmp_path / 'run'} at step 4" in line
    assert "kept: best/;" in line and "--resume" in line  # best/ of the step-0 evaluation; no checkpoint yet


def test_trackers_write_inside_the_run_with_the_metrics_file_names(asset_cache, tmp_path):
    """TensorBoard, wandb (offline) and trackio (its local store) land in output_dir, with metrics.jsonl's names,
    the config and the table."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    cli("train", "--config", QUICKSTART, f"training.output_dir={run}", "training.max_steps=4",
        "training.eval_steps=2", "training.save_strategy=no", "training.logging_steps=1",
        "training.per_device_train_batch_size=4", "data.eval_limit=8", "training.report_to=[tensorboard, wandb, trackio]",
        env=env, cwd=tmp_path)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()  # nothing beside the run
    logged = {key for r in records(run) for key, v in r.items() if isinstance(v, float) and key != "step"}
    [events] = (run / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert logged <= set(board.Tags()["scalars"]) and {"loss", "eval_loss", "rewards/accuracies"} <= logged
    assert [e.step for e in board.Scalars("eval_loss")] == [0, 2, 4]
    texts = set(board.Tags()["tensors"])
    assert {"config/text_summary", "results/text_summary"} <= texts
    assert b"Pref. accuracy" in board.Tensors("results/text_summary")[0].tensor_proto.string_val[0]
    [wandb_run] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(wandb_run)
    assert {"loss", "eval_loss", "rewards/accuracies"} <= set().union(*history) and len(history) >= 4
    with sqlite3.connect(run / "trackio" / "vlm-orpo.db") as db:  # trackio's store, read without trackio
        rows = [(step, json.loads(m)) for name, step, m in db.execute("select run_name, step, metrics from metrics")
                if name == run.name]
        [config] = [json.loads(c) for (c,) in db.execute("select config from configs where run_name = ?", (run.name,))]
    assert logged <= set().union(*(m for _, m in rows)) and [s for s, m in rows if "eval_loss" in m] == [0, 2, 4]
    assert config["lora"]["r"] == 16 and any("Pref. accuracy" in json.dumps(m) for _, m in rows)


def wandb_history(path: Path) -> list[dict]:
    """The logged rows of an offline wandb run file: a LevelDB-style log (7-byte file header, 32 KiB blocks of
    records with a 7-byte header: crc, length, type full/first/middle/last) of protobuf `Record`s. wandb 0.31 no
    longer ships a Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a record header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_trackio_already_bound_to_another_store_is_one_line(tmp_path):
    """trackio fixes its store's folder when imported; a run that cannot log into its own folder says so."""
    import trackio  # noqa: F401 - this process's trackio, bound to its default store
    from trackio import utils

    from vlm_orpo.errors import ConfigError
    from vlm_orpo.trackers import point_trackio_at

    point_trackio_at(Path(utils.TRACKIO_DIR))  # the folder it is bound to: nothing to say
    with pytest.raises(ConfigError, match=r"^trackio already writes to .+; run `vlm-orpo train` in a new process"):
        point_trackio_at(tmp_path / "run" / "trackio")


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    from test_cli import assert_one_line_error

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = train_in_process(capsys, f"training.output_dir={tmp_path / 'run'}", "training.report_to=wandb")
    assert_one_line_error(result, "training.report_to=wandb needs the wandb package", "vlm-orpo[track]")
