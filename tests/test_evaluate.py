"""`vlm-orpo evaluate`: the table, per-pair output against a plain forward, generations, POPE, bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import datasets
import pytest
import torch
from PIL import Image

from conftest import QUICKSTART, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(quickstart_run, tmp_path_factory):
    run, _ = quickstart_run
    out = tmp_path_factory.mktemp("eval")
    pope = out / "pope.jsonl"
    write_pope(pope)
    result = run_cli(
        "evaluate", "--config", QUICKSTART, "--adapters", str(run / "best"), str(run / "final"),
        "--lambda", "1", "--out", str(out), "--per-pair", str(out / "pairs.jsonl"), "--generate", "4",
        "--pope", str(pope), "--limit", "24",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out, result.stdout


def write_pope(path):
    """A POPE-style file from the bundled validation images: is there a <colour> shape? yes / no."""
    from vlm_orpo.assets import ensure_assets

    rows = datasets.load_dataset("parquet", data_files=ensure_assets()["validation"])["train"]
    rows = [r for r in rows if r["task"] == "colour"][:6]
    image_dir = path.parent / "pope_images"
    image_dir.mkdir()
    lines = []
    for i, row in enumerate(rows):
        row["image"].save(image_dir / f"{i}.png")
        other = "blue" if row["target"] != "blue" else "red"
        for colour, label in ((row["target"], "yes"), (other, "no")):
            question = f"Is there a {colour} shape in the image?"
            lines.append(json.dumps({"image": f"pope_images/{i}.png", "question": question, "label": label}))
    path.write_text("\n".join(lines) + "\n")


def test_table_shows_tuned_adapters_beat_the_base(evaluated):
    run, out, stdout = evaluated
    results = json.loads((out / "results.json").read_text())["rows"]
    base, best, final = results["base"], results[str(run / "best")], results[str(run / "final")]
    for tuned in (best, final):
        assert tuned["rewards/accuracies"] > base["rewards/accuracies"] + 0.2
        assert tuned["loss"] < base["loss"]
    assert "| base |" in stdout and "ORPO loss (λ = 1)" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().startswith("name,loss,nll_loss,or_loss,rewards/accuracies")
    assert Image.open(out / "results.png").size[0] > 500


def test_per_pair_file_matches_a_plain_forward(evaluated, asset_cache, tiny_processor):
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.data.packing import EncodedPair
    from vlm_orpo.modeling.plain import plain_pair_logps

    run, out, _ = evaluated
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records].count("base") == 24 and len(records) == 72
    keys = {"model", "idx", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_logp", "rejected_logp",
            "log_odds", "sft_loss", "or_loss", "loss"}
    assert all(set(r) == keys for r in records)

    # Recompute the base rows with the plain two-sequence forward, from the ids in the file.
    from vlm_orpo.config import DataConfig
    from vlm_orpo.data.packing import PairEncoder, load_pairs

    encoder = PairEncoder(tiny_processor, 32)
    _, validation, _ = load_pairs(DataConfig(validation_split="validation", where={"task": "colour"}), encoder,
                                  train=False, limit=24)
    images = {validation.rows[i]["idx"]: validation[i].image_inputs for i in range(4)}
    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"]).eval()
    base = [r for r in records if r["model"] == "base"][:4]
    pairs = [EncodedPair(r["idx"], r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], images[r["idx"]]) for r in base]
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs, tiny_processor.tokenizer.pad_token_id)
    torch.testing.assert_close(plain.chosen, torch.tensor([r["chosen_logp"] for r in base]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.rejected, torch.tensor([r["rejected_logp"] for r in base]), rtol=1e-5, atol=1e-5)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_generations_html_shows_images_and_hallucination_rates(evaluated, tmp_path):
    _, out, stdout = evaluated
    page = (out / "generations.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == 4
    for src in parser.sources:
        header, data = src.split(",", 1)
        assert header == "data:image/png;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 0
    assert "hallucination rate (synthetic task)" in stdout and "Hallucination rate" in page
    chromium = shutil.which("chromium")
    if chromium:  # the page also opens in a real browser and renders pictures
        shot = tmp_path / "page.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                        (out / "generations.html").as_uri()], capture_output=True, timeout=120)
        colours = Image.open(shot).convert("RGB").getcolors(1 << 20)
        assert colours is None or len(colours) > 20  # more than text on white: images rendered


def test_pope_metrics_reported(evaluated):
    run, out, stdout = evaluated
    rows = json.loads((out / "results.json").read_text())["rows"]
    for metrics in rows.values():
        assert 0 <= metrics["pope_f1"] <= 1 and 0 <= metrics["pope_accuracy"] <= 1
    assert "| Name | POPE accuracy |" in stdout


def test_a_pope_file_with_a_missing_image_names_the_row(tmp_path):
    from vlm_orpo.config import ConfigError
    from vlm_orpo.evaluate import load_pope

    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    rows = [{"image": "ok.png", "question": "Is there a red square?", "label": "yes"},
            {"image": "gone.png", "question": "Is there a cat?", "label": "no"}]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"pope.jsonl row 1: undecodable image"):
        load_pope(str(tmp_path / "pope.jsonl"))


def test_bad_adapter_path_is_a_clear_error(asset_cache, tmp_path):
    result = run_cli("evaluate", "--config", QUICKSTART, "--adapters", str(tmp_path / "missing"), "--limit", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "adapter not found" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("evaluate", "--config", QUICKSTART, "--adapters", str(tmp_path / "empty"), "--limit", "2")
    assert result.returncode == 2 and "not a PEFT adapter directory" in result.stderr


def test_bad_rows_are_reported_row_by_row_without_traceback(asset_cache, tmp_path):
    good = datasets.load_dataset("parquet", data_files=asset_cache["validation"])["train"].select(range(3))
    rows = [dict(r) for r in good.cast_column("image", datasets.Image(decode=False))]
    rows[0]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    rows[1]["chosen"] = ""
    rows[2]["rejected"] = rows[2]["chosen"]
    extra = dict(good.cast_column("image", datasets.Image(decode=False))[0])
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows + [extra]).cast_column("image", datasets.Image()).to_parquet(str(path))
    result = run_cli("evaluate", "--config", QUICKSTART, "--data", str(path), "--split", "train",
                     "data.where={}", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    log = result.stderr
    assert "row 0" in log and "undecodable image" in log
    assert "row 1" in log and "empty chosen" in log
    assert "row 2" in log and "chosen identical to rejected" in log
    assert "kept train 1; skipped 3" in result.stdout


def test_evaluate_honours_sft_on_prompt_from_the_config(asset_cache, tmp_path, capsys):
    """The collator scores the prompt's text exactly when loss.sft_on_prompt is set, and the loss reads it from
    the batch (this used to end in a ValueError traceback)."""
    from test_cli import main_in_process

    rows = {}
    for flag in ("false", "true"):
        result = main_in_process(capsys, "evaluate", "--config", QUICKSTART, f"loss.sft_on_prompt={flag}",
                                 "--limit", "4", "--out", str(tmp_path / flag))
        assert result.returncode == 0, result.stderr[-3000:]
        rows[flag] = json.loads((tmp_path / flag / "results.json").read_text())["rows"]["base"]
    off, on = rows["false"], rows["true"]
    assert on["logps/chosen"] == off["logps/chosen"] and on["or_loss"] == off["or_loss"]
    assert on["nll_loss"] != off["nll_loss"] and on["loss"] - off["loss"] == pytest.approx(
        on["nll_loss"] - off["nll_loss"], abs=1e-6)


def test_evaluate_reports_the_configured_loss(asset_cache, tmp_path, capsys):
    """A DPO config: the table says so, the CSV has its columns, and the per-pair file keeps mean log-probs."""
    from test_cli import main_in_process

    out = tmp_path / "dpo"
    result = main_in_process(capsys, "evaluate", "--config", str(QUICKSTART).replace("quickstart", "quickstart_dpo"),
                             "--limit", "4", "--out", str(out), "--per-pair", str(out / "pairs.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| DPO loss (β = 0.1) |" in (out / "results.md").read_text()
    base = json.loads((out / "results.json").read_text())["rows"]["base"]
    assert base["loss"] == pytest.approx(0.6931, abs=1e-4) and base["rewards/margins"] == 0  # its own reference
    assert (out / "results.csv").read_text().startswith("name,loss,rewards/accuracies")
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    tokens = [len(r["chosen_ids"]) for r in records]
    assert all(-20 < r["chosen_logp"] < 0 for r in records) and max(tokens) > 1  # a mean per token, not a sum
