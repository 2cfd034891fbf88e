"""`vlm-orpo train --dry-run --accelerate-config FILE`: every bundled launch config checks against the configs it
is documented with, and each mistake the check can see is a one-line error (DeepSpeed itself cannot run here)."""

from __future__ import annotations

import pytest

from conftest import QUICKSTART, ROOT
from test_cli import assert_one_line_error, main_in_process

ACCELERATE = ROOT / "configs" / "accelerate"


def dry_run(capsys, launch_config, *args, config=QUICKSTART):
    return main_in_process(capsys, "train", "--config", str(config), *args, "--dry-run",
                           "--accelerate-config", str(launch_config))


@pytest.mark.parametrize("launch, config, expected", [
    ("ddp.yaml", "llava16_rlaifv.yaml", "launch: DDP, 8 processes on 1 machine, mixed precision bf16; "
                                        "1 pairs x accumulation 4 x 8 processes = 32 pairs a step"),
    ("fsdp.yaml", "qwen25vl_rlaifv.yaml", "launch: FSDP2, 8 processes"),
    ("deepspeed_zero2.yaml", "llava16_rlaifv_dpo.yaml", "launch: DeepSpeed ZeRO-2, 8 processes"),
    ("deepspeed_zero3.yaml", "llava16_rlaifv_dpo.yaml", "launch: DeepSpeed ZeRO-3, 8 processes"),
])
def test_bundled_launch_configs_check_against_their_run_configs(asset_cache, capsys, launch, config, expected):
    result = dry_run(capsys, ACCELERATE / launch, config=ROOT / "configs" / config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    if "deepspeed" in launch:
        assert "not runnable here" in result.stdout  # said, not hidden: no GPU and no deepspeed on this machine


def test_fsdp_wraps_the_layers_the_model_has(asset_cache, capsys):
    result = dry_run(capsys, ACCELERATE / "fsdp_cpu.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "launch: FSDP2, 2 processes on 1 machine" in result.stdout
    assert "wraps: CLIPEncoderLayer, CLIPVisionEmbeddings, MistralDecoderLayer\n" in result.stdout  # no CLIPTextEmbeddings


def write(tmp_path, text: str):
    path = tmp_path / "launch.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, args, needles", [
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer\n", [],
     ["names Qwen2DecoderLayer", "its layers: CLIPEncoderLayer, CLIPVisionEmbeddings, MistralDecoderLayer"]),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 4\n", [],
     ["gradient_accumulation_steps is 4 but training.gradient_accumulation_steps is 1"]),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 4\n", [], ["zero_stage must be 0, 1, 2 or 3"]),
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_activation_checkpointing: true\n",
     ["training.gradient_checkpointing=true"], ["both on"]),
    ("distributed_type: MULTI_GPUS\n", [], ["distributed_type 'MULTI_GPUS' is not one of"]),
    ("distributed_type: MULTI_GPU\nnum_processes: 3\nnum_machines: 2\n", [], ["not a multiple of num_machines 2"]),
    ("distributed_type: MULTI_GPU\nnum_processes: 0\n", [], ["num_processes must be a positive integer"]),
    ("mixed_precision: fp16\n", ["training.bf16=true"], ["mixed_precision fp16 but training.bf16 is true"]),
    ("- not a mapping\n", [], ["an accelerate config is a mapping"]),
    ("distributed_type: [\n", [], ["not valid YAML"]),
])
def test_launch_mistakes_are_one_line_errors(asset_cache, capsys, tmp_path, text, args, needles):
    assert_one_line_error(dry_run(capsys, write(tmp_path, text), *args), *needles)


def test_two_machines_print_the_command_for_each(asset_cache, capsys, tmp_path):
    result = dry_run(capsys, write(tmp_path, "distributed_type: MULTI_GPU\nnum_processes: 16\nnum_machines: 2\n"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "16 processes on 2 machines" in result.stdout and "--machine_rank 0...1" in result.stdout


def test_a_launch_config_needs_dry_run_and_a_file(asset_cache, capsys, tmp_path):
    assert_one_line_error(main_in_process(capsys, "train", "--config", QUICKSTART, "--accelerate-config",
                                          str(ACCELERATE / "ddp.yaml")), "with --dry-run", "accelerate launch")
    assert_one_line_error(dry_run(capsys, tmp_path / "missing.yaml"), "accelerate config not found")
