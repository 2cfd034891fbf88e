"""The command line: subcommands, offline assets, dry runs and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import QUICKSTART, ROOT
from conftest import run_cli as cli
from vlm_orpo.assets import TINY_MODELS


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_subcommand():
    result = cli("--help")
    assert result.returncode == 0
    for name in ("train", "evaluate", "merge", "quantize", "serve", "chat", "assets"):
        assert name in result.stdout
    for name in ("train", "evaluate", "assets"):
        assert cli(name, "--help").returncode == 0


def test_assets_json_offline(asset_cache):
    result = cli("assets", "--json")
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    tiny_models = paths.pop("tiny_models")  # every family's tiny model, built offline
    assert paths == asset_cache
    assert set(tiny_models) == set(TINY_MODELS) and tiny_models["llava_next"] == paths["tiny_model"]
    assert all((Path(path) / "config.json").is_file() for path in tiny_models.values())
    assert "tiny_model" in cli("assets").stdout


def test_dry_run_accepts_the_seed_config_offline(asset_cache):
    result = cli("train", "--config", str(ROOT / "configs" / "llava16_rlaifv.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "llava-hf/llava-v1.6-mistral-7b-hf" in result.stdout and "ORPO lambda 10" in result.stdout
    assert "batch 1 x accumulation 4" in result.stdout


def test_dry_run_accepts_the_qwen25vl_config_offline(asset_cache, capsys):
    result = main_in_process(capsys, "train", "--config", str(ROOT / "configs" / "qwen25vl_rlaifv.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in result.stdout and "loss dpo (beta 0.1)" in result.stdout
    assert "batch 2 x accumulation 4" in result.stdout


def test_dry_run_of_quickstart_counts_trainable_parameters(asset_cache):
    result = cli("train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model family: llava" in result.stdout and "trainable parameters" in result.stdout


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["training.learning_rate=-1e-4"], ["learning_rate must be positive"]),
        (["training.learnig_rate=1e-4"], ["unknown key training.learnig_rate", "learning_rate"]),
        (["data.source=/no/such/data.parquet"], ["data path not found"]),
        (["lora.method=dora"], ["lora.method"]),
        (["model.name_or_path=/no/such/model"], ["model path not found"]),
        (["nonsense"], ["section.key=value"]),
        (["data.where=task"], ["data.where must be dict"]),
        (["data.eval_limit=-1"], ["data.eval_limit must be positive"]),
        (["lora.r=sixteen"], ["lora.r must be int"]),
        (["training.per_device_train_batch_size=2.5"], ["per_device_train_batch_size must be int, got 2.5"]),
        (["training.per_device_eval_batch_size=0"], ["per_device_eval_batch_size must be positive, got 0"]),
        (["training.learning_rate=fast"], ["training.learning_rate must be float, got 'fast'"]),
        (["training.learning_rate=.nan"], ["training.learning_rate must be a finite number"]),
        (["training.num_train_epochs=-1"], ["num_train_epochs must be positive"]),
        (["lora.alpha=-3"], ["lora.alpha must be positive, got -3"]),
        (["loss.orpo_lambda=.inf"], ["loss.orpo_lambda must be a finite number, got inf"]),
        (["loss.type=kto"], ["loss.type must be one of orpo"]),
        (["training.orpo_lambda=2", "loss.orpo_lambda=3"], ["training.orpo_lambda moved to loss.orpo_lambda"]),
    ],
)
def test_bad_config_values_are_one_line_errors(asset_cache, capsys, overrides, needles):
    assert_one_line_error(main_in_process(capsys, "train", "--config", QUICKSTART, *overrides, "--dry-run"), *needles)


def main_in_process(capsys, *args):
    """`vlm-orpo ARGS` through `cli.main` in this process (seconds faster than a fresh interpreter per case);
    an exception that escapes main fails the test, as a traceback would."""
    import subprocess

    from vlm_orpo.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_a_section_that_is_not_a_mapping_is_one_line_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("loss: 3\n")
    assert_one_line_error(main_in_process(capsys, "train", "--config", str(tmp_path / "c.yaml")),
                          "section 'loss' must be a mapping")


def test_a_vlm_with_no_family_is_planned_on_the_plain_forward(asset_cache, tmp_path, capsys, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    args = ("train", "--config", QUICKSTART, f"model.name_or_path={tmp_path}")
    result = main_in_process(capsys, *args, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model family: paligemma; forward: plain, two sequences per pair" in result.stdout
    assert "family paligemma has no shared-prefix support yet: plain two-sequence forward" in caplog.messages
    assert_one_line_error(main_in_process(capsys, *args, "model.forward_mode=packed", "--dry-run"),
                          "forward_mode=packed", "family paligemma has no shared-prefix support")


def test_a_model_that_is_not_image_text_to_text_is_one_line_error(asset_cache, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = main_in_process(capsys, "train", "--config", QUICKSTART, f"model.name_or_path={tmp_path}", "--dry-run")
    assert_one_line_error(result, "'bert' is not an image-text-to-text model")


def test_missing_config_file_is_one_line_error():
    assert_one_line_error(cli("train", "--config", "/no/such.yaml"), "config file not found")


def test_a_hub_name_that_cannot_load_is_one_line_error(asset_cache, tmp_path):
    result = cli("evaluate", "--model", "no-such-org/no-such-vlm", "--out", str(tmp_path))
    assert_one_line_error(result, "cannot load model 'no-such-org/no-such-vlm'")


def test_a_count_below_one_is_a_usage_error():
    result = cli("evaluate", "--batch-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --batch-size: must be at least 1, got 0" in result.stderr


def test_the_orpo_knobs_under_training_still_work_with_one_deprecation_line(asset_cache, tmp_path):
    old = (ROOT / "configs" / "quickstart.yaml").read_text().replace("loss:\n  type: orpo\n  orpo_lambda: 1.0\n", "")
    (tmp_path / "old.yaml").write_text(old.replace("training:\n", "training:\n  orpo_lambda: 7\n  sft_on_prompt: true\n"))
    result = cli("train", "--config", str(tmp_path / "old.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ORPO lambda 7" in result.stdout
    assert result.stderr.count("training.orpo_lambda is deprecated: it moved to loss.orpo_lambda") == 1
    assert result.stderr.count("training.sft_on_prompt is deprecated: it moved to loss.sft_on_prompt") == 1


def test_a_config_directory_is_one_line_error(tmp_path, capsys):
    assert_one_line_error(main_in_process(capsys, "train", "--config", str(tmp_path)), "is a directory")


@pytest.mark.parametrize("flag, value", [("--lambda", "-3"), ("--generate", "-2"), ("--lambda", "inf")])
def test_evaluate_refuses_negative_counts_and_weights(flag, value, capsys):
    result = main_in_process(capsys, "evaluate", flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {flag}: must be at least 0, got {value}" in result.stderr


def test_help_names_the_loss_default():
    from vlm_orpo.config import DEFAULT_ORPO_LAMBDA

    assert f"else {DEFAULT_ORPO_LAMBDA:g}" in " ".join(cli("evaluate", "--help").stdout.split())
