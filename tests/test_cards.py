"""Model cards: the Hub metadata and the body of adapter, merged and quantized cards, from facts (no training)."""

from __future__ import annotations

import json
from collections import Counter

from huggingface_hub import ModelCard

from vlm_orpo.cards import CardFacts, write_merged_card, write_quantized_card, write_training_card
from vlm_orpo.config import DataConfig, LoraSettings, LossConfig, ModelConfig
from vlm_orpo.data.sources import SkipReport

BASE = "llava-hf/llava-v1.6-mistral-7b-hf"
EMPTY = "[More Information Needed]"


def facts(loss: LossConfig, method: str = "lora") -> CardFacts:
    report = SkipReport(reasons=Counter({"image too large": 3, "empty answer": 1}),
                        kept=Counter({"train": 900, "validation": 96}))
    return CardFacts(
        model=ModelConfig(name_or_path=BASE, revision="abc123"),
        data=DataConfig(source="openbmb/RLAIF-V-Dataset", subset_fraction=0.1, validation_fraction=0.1),
        lora=LoraSettings(method=method, r=8, alpha=16),
        loss=loss,
        data_summary=report.summary(),
        command="vlm-orpo train --config configs/rlaif_v.yaml loss.orpo_lambda=10",
    )


def run_dir(tmp_path, name: str):
    """A run folder with metrics.jsonl (train logs and three evals) and an adapter folder holding PEFT's template."""
    run = tmp_path / "run"
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "README.md").write_text(f"---\nbase_model: {BASE}\nlibrary_name: peft\n---\n# Model Card for Model ID\n"
                                      f"{EMPTY}\n")
    evals = [{"step": s, "eval_loss": 0.9 - s / 100, "eval_rewards/accuracies": 0.5 + s / 100,
              "eval_rewards/margins": s / 100, "eval_or_loss": 0.7, "eval_nll_loss": 0.2, "eval_log_odds_chosen": 0.1,
              "eval_rewards/chosen": -1.0, "eval_rewards/rejected": -1.5} for s in (0, 10, 20)]
    records = [evals[0], {"step": 5, "loss": 0.8}, evals[1], {"step": 15, "loss": 0.7}, evals[2]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_orpo_adapter_card(tmp_path):
    folder = run_dir(tmp_path, "best")
    write_training_card(folder, facts(LossConfig(type="orpo", orpo_lambda=10)), "best", step=10, epoch=0.5,
                        max_steps=20, metrics_path=folder.parent / "metrics.jsonl")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == BASE and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.datasets == ["openbmb/RLAIF-V-Dataset"]
    assert {"vlm-orpo", "orpo", "lora"} <= set(card.data.tags)
    text = card.text
    assert EMPTY not in card.content and "Model Card for Model ID" not in card.content
    assert "ORPO loss (λ = 10)" in text and "abc123" in text
    assert "kept train 900, validation 96; skipped 4 (image too large: 3, empty answer: 1)" in text
    assert "LoRA: r 8, alpha 16" in text and "steps: 10 of 20, epoch 0.50" in text
    assert "| Name | ORPO loss (λ = 10) |" in text and "| base (step 0) | 0.9000 |" in text
    assert "| **best** (step 10) | 0.8000 |" in text and "step 20" not in text  # evals after the save are not its
    assert "vlm-orpo train --config configs/rlaif_v.yaml loss.orpo_lambda=10" in text
    assert "transformers " in text and "peft " in text


def test_dpo_card_and_merged_and_quantized(tmp_path):
    folder = run_dir(tmp_path, "final")
    write_training_card(folder, facts(LossConfig(type="dpo", beta=0.2)), "final", step=20,
                        metrics_path=folder.parent / "metrics.jsonl")
    card = ModelCard.load(folder / "README.md")
    assert "dpo" in card.data.tags and "orpo" not in card.data.tags
    assert "DPO loss (β = 0.2)" in card.text and "| Chosen reward |" in card.text
    assert "| **final** (step 20) |" in card.text and EMPTY not in card.content

    merged = tmp_path / "merged"
    merged.mkdir()
    write_merged_card(merged, folder, BASE, dtype="torch.bfloat16")
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == BASE
    assert {"vlm-orpo", "dpo", "merged"} <= set(card.data.tags) and "lora" not in card.data.tags
    assert card.data.datasets == ["openbmb/RLAIF-V-Dataset"]
    assert f"adapter: `{folder.absolute()}`" in card.text and "bfloat16" in card.text
    assert "#### Data" in card.text and "DPO loss (β = 0.2)" in card.text  # the adapter's card, two levels down
    assert EMPTY not in card.content

    quantized = tmp_path / "w4"
    quantized.mkdir()
    write_quantized_card(quantized, str(merged), "W4A16", "W4A16", "rtn")
    card = ModelCard.load(quantized / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == BASE
    assert {"compressed-tensors", "w4a16", "merged", "dpo"} <= set(card.data.tags)
    assert "scheme: W4A16" in card.text and f"`{merged.absolute()}`" in card.text
    assert "###### Data" in card.text and EMPTY not in card.content


def test_merged_card_without_source_card(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text(f"# Model Card for Model ID\n{EMPTY}\n")  # PEFT's template: not carried over
    write_merged_card(tmp_path / "out", adapter, "bundled")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # bundled is no hub id
    assert "has no vlm-orpo card" in card.text and EMPTY not in card.content
