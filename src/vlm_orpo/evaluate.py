"""`vlm-orpo evaluate`: base model and adapters in one table, per-pair output, plots and greedy generations.

Adapters load one at a time onto the same base, so a 7B base is loaded once. Scoring is `scoring.score_batches`,
the same packed forward and loss as training.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import logging
from pathlib import Path

import torch

from vlm_orpo.config import (
    DEFAULT_ORPO_LAMBDA,
    ConfigError,
    add_config_arguments,
    load_config,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from vlm_orpo.errors import BadRow, first_line
from vlm_orpo.images import open_image, png_data_url
from vlm_orpo.data.packing import PairEncoder, load_pairs
from vlm_orpo.modeling.load import adapter_config, load_base_model, load_processor
from vlm_orpo.modeling.forward import pair_collator, resolve_forward_mode
from vlm_orpo.modeling.shared_prefix import set_attention_backend
from vlm_orpo.reporting import columns, plot_comparison, results_table
from vlm_orpo.run_dir import SUMMARY
from vlm_orpo.run_report import write_report
from vlm_orpo.scoring import score_batches

log = logging.getLogger(__name__)
# The per-pair JSONL contract (README, "evaluate") beyond the answers' mean log-probs: field -> the metric of
# `losses.pair_losses` it holds, written when the loss has that metric (ORPO's log-odds and its two terms).
PER_PAIR_METRICS = {"log_odds": "log_odds_chosen", "sft_loss": "nll_loss", "or_loss": "or_loss", "loss": "loss"}


def model_variants(base, adapters: list[str]):
    """Yield (name, model): the base first, then each adapter swapped in on the same base weights."""
    yield "base", base
    if not adapters:
        return
    from peft import PeftModel

    model = None
    for i, adapter in enumerate(adapters):
        name = f"a{i}"
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(Path(adapter).expanduser()), adapter_name=name)
            else:
                model.load_adapter(str(Path(adapter).expanduser()), adapter_name=name)
                model.set_adapter(name)
                model.delete_adapter(f"a{i - 1}")
        except ConfigError:
            raise
        except Exception as exc:  # shape mismatch, missing weights: one line for the user
            raise ConfigError(f"cannot load adapter {adapter}: {first_line(exc)}")
        model.eval()
        yield adapter, model


class _Batches:
    """A DataLoader over the pair dataset with the packed collator (workers decode images in parallel)."""

    def __init__(self, dataset, collator, batch_size):
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)

    def __iter__(self):
        from rich.progress import track

        yield from track(self.loader, description="scoring", total=len(self.loader), transient=True)


HELP = "score base and adapters on preference pairs; one table"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--model", help="base model: a hub name, a local directory, or 'bundled' (default: config's)")
    p.add_argument("--adapters", nargs="*", default=[], help="adapter directories, each scored on the same base")
    p.add_argument("--data", help="data source (default: config's data.source)")
    p.add_argument("--split", help="named split to score (default: config's validation split or fraction)")
    p.add_argument("--limit", type=positive_int, help="score at most N pairs")
    p.add_argument("--lambda", dest="orpo_lambda", type=non_negative_float, default=None,
                   help=f"ORPO lambda (default: the config's loss.orpo_lambda, else {DEFAULT_ORPO_LAMBDA:g})")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward")
    p.add_argument("--out", default="eval", help="output directory for results.md/json/csv and plots")
    p.add_argument("--per-pair", help="write one JSON object per pair and model to this JSONL file")
    p.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                   help="answer N prompts greedily with each model")
    p.add_argument("--pope", help="POPE-style file (image, question, label yes/no) to score hallucination")


def run(args) -> dict:
    cfg = load_config(args.config, args.overrides)
    if args.model:
        cfg.model.name_or_path = args.model
    if args.data:
        cfg.data.source = args.data
    if args.split:
        cfg.data.validation_split = args.split
    elif cfg.data.validation_split is None and cfg.data.validation_fraction == 0:
        cfg.data.validation_split = "validation"
    if args.orpo_lambda is not None:
        cfg.loss.orpo_lambda = args.orpo_lambda
    for adapter in args.adapters:
        adapter_config(adapter)  # fail before the long part
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    processor = load_processor(cfg.model)
    encoder = PairEncoder(processor, cfg.data.max_answer_tokens, cfg.data.max_prompt_tokens)
    _, dataset, report = load_pairs(cfg.data, encoder, train=False, limit=args.limit or cfg.data.eval_limit)
    print(report.summary())
    if dataset is None:
        raise ConfigError("no usable pairs to evaluate")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(cfg.model, device).eval()
    mode = resolve_forward_mode(cfg.model.forward_mode, base.config)
    set_attention_backend(base, cfg.model.attn_backend if mode == "packed" else "sdpa")
    collator = pair_collator(mode, base, processor.tokenizer.pad_token_id, encoder.image_token_id,
                             cfg.data.max_tokens_per_row, cfg.loss.sft_on_prompt)

    pope = load_pope(args.pope) if args.pope else None
    rows, generations = [], {}
    per_pair = open(args.per_pair, "w") if args.per_pair else None
    try:
        for name, model in model_variants(base, args.adapters):
            batches = _Batches(dataset, collator, args.batch_size)
            scores = score_batches(model, batches, cfg.loss)
            rows.append((name, scores.means()))
            if per_pair:
                write_per_pair(per_pair, name, scores)
            if args.generate:
                generations[name] = generate_answers(model, encoder, dataset, args.generate)
            if pope:
                rows[-1][1].update(pope_scores(model, encoder, pope))
            print(f"scored {name}: {len(scores)} pairs", flush=True)
    finally:
        if per_pair:
            per_pair.close()

    table = results_table(rows, cfg.loss)
    if pope:
        table += "\n\n" + pope_table(rows)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"loss": dataclasses.asdict(cfg.loss), "rows": dict(rows)}, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *(k for k, _ in columns(cfg.loss))])
        writer.writerows([name, *(m[k] for k, _ in columns(cfg.loss))] for name, m in rows)
    plot_comparison(rows, cfg.loss, out / "results.png")
    if generations:
        rates = write_generations(out / "generations.html", dataset, generations)
        if rates:
            print("hallucination rate (synthetic task): " + ", ".join(f"{n}: {r:.1%}" for n, r in rates.items()))
    if (out.parent / SUMMARY).is_file():  # --out inside a finished run: its report.html gains this evaluation
        print(f"report: {write_report(out.parent)}")
    return dict(rows)


def pope_table(rows) -> str:
    keys = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio")
    lines = ["| Name | POPE accuracy | Precision | Recall | F1 | Yes ratio |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([name, *(f"{m[k]:.3f}" for k in keys)]) + " |" for name, m in rows]
    return "\n".join(lines)


def write_per_pair(f, model_name: str, scores) -> None:
    """One JSON object per pair: ids as fed, each answer's mean per-token log-prob, and the loss's own terms."""
    values = {f"{answer}_logp": v.tolist() for answer, v in scores.answer_logps.items()}
    values |= {field: scores.values[m].tolist() for field, m in PER_PAIR_METRICS.items() if m in scores.values}
    for i, meta in enumerate(scores.meta):
        f.write(json.dumps({"model": model_name, **meta, **{field: v[i] for field, v in values.items()}}) + "\n")


@torch.no_grad()
def generate(model, encoder: PairEncoder, image, question, max_new_tokens: int) -> str:
    """Greedy answer to one image and question, formatted with the same chat template as training."""
    prompt = encoder.prompt_text(question)
    device = next(model.parameters()).device
    inputs = encoder.processor(
        images=[open_image(image)], text=[prompt], return_tensors="pt", **encoder.prompt_tokenizer_kwargs(prompt)
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return encoder.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def generate_answers(model, encoder: PairEncoder, dataset, n: int) -> list[str]:
    rows = (dataset.rows[i] for i in range(min(n, len(dataset))))
    return [generate(model, encoder, r["image"], r["question"], encoder.max_answer_tokens) for r in rows]


def load_pope(path: str) -> list[dict]:
    """POPE-style rows (image, question, label yes/no) from any file format the data sources read."""
    from vlm_orpo.data.sources import load_source

    data, base_dir = load_source(path, "train")
    missing = {"image", "question", "label"} - set(data.column_names)
    if missing:
        raise ConfigError(f"POPE file {path} lacks column(s) {sorted(missing)}; it needs image, question, label")
    rows = []
    for number, row in enumerate(data):
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ConfigError(f"POPE file {path} row {number}: label must be yes or no, got {row['label']!r}")
        try:
            image = open_image(row["image"], base_dir)
        except BadRow as exc:  # a benchmark with a hole in it is not the same benchmark: stop, say where
            raise ConfigError(f"POPE file {path} row {number}: {exc}") from None
        rows.append({"image": image, "question": row["question"], "label": label})
    return rows


def pope_scores(model, encoder: PairEncoder, rows: list[dict]) -> dict[str, float]:
    """Object-hallucination metrics of POPE (Li et al. 2023): accuracy, precision, recall, F1 and yes-ratio."""
    said_yes = []
    for row in rows:
        answer = generate(model, encoder, row["image"], f"{row['question']} Answer yes or no.", 4).lower()
        said_yes.append(answer.lstrip(" .,!").startswith("yes"))
    truth = [r["label"] == "yes" for r in rows]
    tp = sum(p and t for p, t in zip(said_yes, truth))
    fp = sum(p and not t for p, t in zip(said_yes, truth))
    fn = sum(not p and t for p, t in zip(said_yes, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "pope_accuracy": sum(p == t for p, t in zip(said_yes, truth)) / len(rows),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "pope_yes_ratio": sum(said_yes) / len(rows),
    }


def write_generations(path: Path, dataset, generations: dict[str, list[str]]) -> dict[str, float]:
    """Side-by-side HTML; on the synthetic set (task/target columns) also a task-level hallucination rate."""
    from vlm_orpo.assets.synthetic import score_answer
    from vlm_orpo.data.validation import rejected_answers

    names = list(generations)
    n = len(generations[names[0]])
    correct = {name: 0 for name in names}
    scored = 0
    cells = []
    for i in range(n):
        raw = dataset.rows.raw(i)
        row = dataset.rows[i]
        truth = (raw.get("task"), raw.get("target"))
        answers = []
        for name in names:
            text = generations[name][i]
            verdict = ""
            if truth[0]:
                ok = score_answer(truth[0], truth[1], text)
                correct[name] += ok
                verdict = " ✓" if ok else " ✗ hallucinated"
            answers.append(f"<td><b>{html.escape(name)}</b>{verdict}<br>{html.escape(text)}</td>")
        scored += bool(truth[0])
        question = row["question"] if isinstance(row["question"], str) else json.dumps(row["question"])
        cells.append(
            f"<tr><td><img src='{png_data_url(open_image(row['image']))}' width='160'></td>"
            f"<td>{html.escape(question)}<br><small>chosen: {html.escape(row['chosen'])}<br>"
            f"rejected: {html.escape(' | '.join(rejected_answers(row)))}</small></td>{''.join(answers)}</tr>"
        )
    rates = {name: 1 - correct[name] / scored for name in names} if scored else {}
    summary = "".join(f"<li>{html.escape(k)}: {v:.1%}</li>" for k, v in rates.items())
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>vlm-orpo generations</title>"
        "<style>td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>Greedy generations</h1>{'<p>Hallucination rate:</p><ul>' + summary + '</ul>' if rates else ''}"
        f"<table>{''.join(cells)}</table></body></html>"
    )
    return rates
