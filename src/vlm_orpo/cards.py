"""Model cards (README.md with the Hub's YAML metadata) for adapters, merged models and quantized models.

Training sets `PreferenceTrainer.card_facts` (a `CardFacts`: the run's config, its data counts, the command and
the library versions); every adapter folder it saves (best/, final/, checkpoints) then gets a card that replaces
PEFT's empty template: base model, data, loss, LoRA settings, steps, the run's evaluation table so far. `merge` and
`quantize` write cards that say what they were made from and carry the source folder's card inside theirs.
The metadata is `huggingface_hub.ModelCardData`, so `ModelCard.load` reads it back and the Hub indexes it.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vlm_orpo.config import BUNDLED, DataConfig, LoraSettings, LossConfig, ModelConfig, RunConfig
from vlm_orpo.reporting import LOSS_NAMES, loss_title, read_jsonl, results_table

log = logging.getLogger(__name__)

CARD = "README.md"
TAG = "vlm-orpo"
PIPELINE = "image-text-to-text"
LIBRARIES = ("torch", "transformers", "peft", "vlm-orpo")
METHODS = {"lora": "LoRA", "qlora": "QLoRA"}
MAX_EVAL_ROWS = 12  # longer runs show the base row and the latest evaluations; metrics.jsonl has them all


def command_line(argv: list[str] | None = None) -> str:
    """The command that made this, as one shell line (`vlm-orpo train ...` rather than the script's full path)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        first = Path(argv[0])
        if first.name == "vlm-orpo":
            argv[0] = "vlm-orpo"
        elif first.name in ("cli.py", "__main__.py") and first.parent.name == "vlm_orpo":
            argv[:1] = ["python", "-m", "vlm_orpo.cli"]
        elif first.suffix == ".py":
            argv.insert(0, "python")
    return shlex.join(argv)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class CardFacts:
    """What a training run knows about itself that its adapters' cards tell; steps and evals are read at save."""

    model: ModelConfig
    data: DataConfig
    lora: LoraSettings
    loss: LossConfig
    data_summary: str = ""  # `SkipReport.summary()`: kept per split, skipped by reason
    command: str = field(default_factory=command_line)
    versions: dict[str, str] = field(default_factory=library_versions)

    @classmethod
    def from_run(cls, cfg: RunConfig, report=None) -> CardFacts:
        return cls(cfg.model, cfg.data, cfg.lora, cfg.loss, report.summary() if report is not None else "")


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (owner/name, not a local path, not the bundled assets), else None."""
    if not name or name == BUNDLED or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _data_hub_id(source: str) -> str | None:
    from vlm_orpo.data.sources import local_source_path

    return None if source == BUNDLED or local_source_path(source) is not None else hub_id(source)


def _model_line(name: str, revision: str | None = None) -> str:
    if name.partition(":")[0] == BUNDLED:
        text = f"the bundled tiny {name.partition(':')[2] or 'llava_next'} model (`vlm-orpo assets`)"
    elif hub_id(name):
        text = f"[{name}](https://huggingface.co/{name})"
    else:
        return f"`{name}` (a local folder)" + (f", revision `{revision}`" if revision else "")
    return f"{text}, revision {f'`{revision}`' if revision else 'not pinned (the default branch when it was loaded)'}"


def _versions(versions: dict[str, str]) -> list[str]:
    return ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]


def _command(command: str) -> list[str]:
    return ["## Command", "", "```bash", command, "```", ""]


def eval_rows(metrics_path: Path, step: int | None = None, name: str = "this") -> tuple[list, int]:
    """(rows of `results_table`, how many earlier evaluations were left out) from the eval records of metrics.jsonl."""
    path = Path(metrics_path)
    records = [r for r in read_jsonl(path) if "eval_loss" in r] if path.is_file() else []
    if step is not None:
        records = [r for r in records if r["step"] <= step]
    rows = []
    for i, record in enumerate(records):
        label = "base (step 0)" if i == 0 and record["step"] == 0 else f"step {record['step']}"
        if step is not None and record["step"] == step:
            label = f"**{name}** (step {step})" if record["step"] else f"**{name}** = base (step 0)"
        rows.append((label, {k.removeprefix("eval_"): v for k, v in record.items()}))
    left_out = max(0, len(rows) - MAX_EVAL_ROWS)
    if left_out:
        rows = rows[:1] + rows[-(MAX_EVAL_ROWS - 1):] if rows[0][0].startswith("base") else rows[-MAX_EVAL_ROWS:]
    return rows, left_out


def training_card(facts: CardFacts, name: str, step: int, epoch: float | None = None, max_steps: int | None = None,
                  optimisation: str = "", metrics_path: Path | None = None, adapter: bool = True):
    """The card of an adapter folder (`name`: best, final, checkpoint-N) saved at `step` of a run."""
    from huggingface_hub import ModelCard, ModelCardData

    loss, lora, data = facts.loss, facts.lora, facts.data
    dataset = _data_hub_id(data.source)
    card_data = ModelCardData(
        base_model=hub_id(facts.model.name_or_path),
        library_name="peft" if adapter else "transformers",
        pipeline_tag=PIPELINE,
        datasets=[dataset] if dataset else None,
        tags=[TAG, loss.type, *([lora.method] if adapter else []), "preference-optimization", PIPELINE],
    )
    kind = f"{METHODS.get(lora.method, lora.method)} adapter" if adapter else "fully fine-tuned model"
    run = Path(metrics_path).parent.name if metrics_path else None
    epoch_text = f", epoch {epoch:.2f}" if epoch is not None else ""
    steps = f"{step}" + (f" of {max_steps}" if max_steps else "") + epoch_text
    body = [
        f"# {LOSS_NAMES[loss.type]} {kind} of {facts.model.name_or_path}",
        "",
        f"A {kind} trained with vlm-orpo's {loss_title(loss)}: `{name}/`" + (f" of run `{run}`" if run else "")
        + f", the weights at step {step}{epoch_text}.",
        "",
        "## Base model",
        "",
        f"- {_model_line(facts.model.name_or_path, facts.model.revision)}",
        "",
        "## Data",
        "",
        f"- source: {_data_line(data.source)}; train split `{data.train_split}`, validation "
        + (f"split `{data.validation_split}`" if data.validation_split else
           f"fraction {data.validation_fraction:g}" if data.validation_fraction else "none"),
        ("- subset: all rows" if data.subset_fraction >= 1 else f"- subset: {data.subset_fraction:g} of the rows")
        + f" (seed {data.seed})"
        + (f", where {data.where}" if data.where else "") + f"; answers cut to {data.max_answer_tokens} tokens",
    ]
    if facts.data_summary:
        body.append(f"- counts: {facts.data_summary.removeprefix('data: ')}")
    body += ["", "## Training", "", f"- loss: {loss_title(loss)} — `{loss.describe()}`"
             + (", NLL on the prompt too" if loss.sft_on_prompt else "")]
    if loss.reference_model:
        body.append(f"- reference model: `{loss.reference_model}`")
    if adapter:
        body.append(f"- {METHODS.get(lora.method, lora.method)}: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g}, target modules "
                    f"{lora.target_modules}" + (", projector trained too" if lora.train_projector else ""))
    else:
        body.append(f"- method: {lora.method} (every weight trained)")
    body.append(f"- steps: {steps}")
    if optimisation:
        body.append(f"- optimisation: {optimisation}")
    body += ["", "## Evaluation", ""]
    rows, left_out = eval_rows(metrics_path, step, name) if metrics_path else ([], 0)
    if rows:
        body += [f"The run's validation up to step {step} (metrics.jsonl):", "", results_table(rows, loss), ""]
        if left_out:
            body += [f"{left_out} earlier evaluations are in the run's metrics.jsonl.", ""]
    else:
        body += ["No evaluation: the run had no validation split" if not (data.validation_split or
                 data.validation_fraction) else "No evaluation was recorded up to this step.", ""]
    body += _command(facts.command) + _versions(facts.versions)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))


def _data_line(source: str) -> str:
    if source == BUNDLED:
        return "the bundled synthetic pairs (`vlm-orpo assets`)"
    dataset = _data_hub_id(source)
    return f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else f"`{source}`"


def write_training_card(folder: Path, facts: CardFacts, name: str, **kwargs) -> Path:
    """Write (over PEFT's template) the card of an adapter folder; an adapter_config.json makes it a PEFT card."""
    folder = Path(folder)
    kwargs.setdefault("adapter", (folder / "adapter_config.json").is_file() or facts.lora.method != "full")
    card = training_card(facts, name, **kwargs)
    card.save(folder / CARD)
    return folder / CARD


def read_card(folder: str | Path):
    """The vlm-orpo card of a folder, or None (no card, or another tool's, e.g. PEFT's empty template)."""
    from huggingface_hub import ModelCard

    path = Path(folder).expanduser() / CARD
    if not path.is_file():
        return None
    try:
        card = ModelCard.load(path)
    except Exception as exc:  # a hand-edited card with broken YAML: say so, write ours without it
        log.warning("cannot read %s: %s", path, exc)
        return None
    return card if TAG in (card.data.tags or []) else None


def _demote(text: str) -> list[str]:
    """Markdown headings two levels down (outside code fences), so a source's card nests under our `##` heading."""
    lines, fenced = [], False
    for line in text.strip().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("##" + line if line.startswith("#") and not fenced else line)
    return lines


def _derived_card(out: Path, title: str, made_from: list[str], source_dir: str | Path | None, base: str | None,
                  extra_tags: list[str]) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    source = read_card(source_dir) if source_dir is not None else None
    src = source.data if source is not None else None
    tags = [TAG, *[t for t in (src.tags or []) if t not in (TAG, "lora", "qlora", PIPELINE)]] if src else [TAG]
    card_data = ModelCardData(
        base_model=(src.base_model if src and src.base_model else None) or hub_id(base),
        library_name="transformers",
        pipeline_tag=PIPELINE,
        datasets=src.datasets if src and src.datasets else None,
        tags=list(dict.fromkeys([*tags, *extra_tags, PIPELINE])),
    )
    body = [f"# {title}", "", "## Made from", "", *made_from, ""]
    body += _command(command_line()) + _versions(library_versions())
    body += ["## The source's card", ""]
    if source_dir is None:
        body += [f"`{base}` is not a local folder: its card is on the Hub.", ""]
    elif source is not None:
        body += [f"The card of `{Path(source_dir).expanduser().absolute()}`:", "", *_demote(source.text), ""]
    else:
        body += [f"`{source_dir}` has no vlm-orpo card, so how it was trained is not recorded here.", ""]
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)).save(Path(out) / CARD)
    return Path(out) / CARD


def write_merged_card(out: str | Path, adapter: str | Path, base: str, revision: str | None = None,
                      dtype: str | None = None) -> Path:
    """The card of a merged model: the adapter and base it came from, and the adapter's card inside."""
    adapter = Path(adapter).expanduser()
    made_from = [f"- adapter: `{adapter.absolute()}`", f"- base model: {_model_line(base, revision)}"]
    if dtype:
        made_from.append(f"- weights saved as {dtype.removeprefix('torch.')}")
    made_from.append("- LoRA folded into the weights (`merge_and_unload`); loads in transformers and vLLM")
    return _derived_card(Path(out), f"Merged model: {adapter.name} of {base}", made_from, adapter, base, ["merged"])


def write_quantized_card(out: str | Path, model: str, scheme: str, preset: str, method: str,
                         calibration: dict[str, Any] | None = None) -> Path:
    """The card of a quantized model: the model it came from (and its card inside), the scheme, the calibration."""
    local = Path(model).expanduser().is_dir()
    source = f"`{Path(model).expanduser().absolute()}`" if local else _model_line(model)
    made_from = [f"- model: {source}",
                 f"- scheme: {scheme} (compressed-tensors {preset}, {method}) with llm-compressor; the vision "
                 "tower, the projector and lm_head stay in full precision"]
    if calibration:
        made_from.append("- calibration: " + ", ".join(f"{k} {v}" for k, v in calibration.items()))
    else:
        made_from.append("- calibration: none (round-to-nearest)")
    return _derived_card(Path(out), f"{scheme} quantized model of {Path(model).name}", made_from,
                         model if local else None, model, ["compressed-tensors", scheme.lower()])
