"""Results tables in the seed's style, and the PNG plots of training curves and model comparisons."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlm_orpo.config import LossConfig

log = logging.getLogger(__name__)

ACCURACY = "rewards/accuracies"
LOSS_NAMES = {
    "orpo": "ORPO", "dpo": "DPO", "ipo": "IPO", "hinge": "Hinge", "robust": "Robust DPO",
    "sigmoid_norm": "Length-normalised DPO", "apo_zero": "APO-zero", "simpo": "SimPO", "cpo": "CPO",
}
_SYMBOLS = {"orpo_lambda": "λ", "beta": "β", "label_smoothing": "ε", "simpo_gamma": "γ", "cpo_alpha": "α",
            "sft_weight": "SFT weight"}  # how the loss column's title writes each knob


def loss_title(loss: LossConfig) -> str:
    """"ORPO loss (λ = 1)", "DPO loss (β = 0.1)", "SimPO loss (β = 2, γ = 0.5)": the loss and the values it reads."""
    return f"{LOSS_NAMES[loss.type]} loss ({', '.join(f'{_SYMBOLS[k]} = {v:g}' for k, v in loss.knobs().items())})"


def columns(loss: LossConfig) -> tuple[tuple[str, str], ...]:
    """(metric name as `losses.pair_losses` gives it, column title) of the results table for this loss."""
    cols = [("loss", loss_title(loss))]
    if loss.nll_weight:
        cols.append(("nll_loss", "SFT loss"))
    if loss.type == "orpo":
        cols.append(("or_loss", "OR loss"))
    cols += [(ACCURACY, "Pref. accuracy"), ("rewards/margins", "Reward margin")]
    cols += [("log_odds_chosen", "Log-odds")] if loss.type == "orpo" else [
        ("rewards/chosen", "Chosen reward"), ("rewards/rejected", "Rejected reward")]
    return tuple(cols)


def curves(loss: LossConfig) -> tuple[tuple[str, str], ...]:
    """(metric name, plot title): each plot has the train curve and the eval curve (`eval_` + name) of one metric."""
    keep = {"loss", "nll_loss", "or_loss", ACCURACY} if loss.type == "orpo" else {"loss", "nll_loss", ACCURACY,
                                                                                  "rewards/margins"}
    titles = {"loss": f"{LOSS_NAMES[loss.type]} loss", ACCURACY: "Preference accuracy"}
    return tuple((key, titles.get(key, title)) for key, title in columns(loss) if key in keep)


def results_table(rows: list[tuple[str, dict[str, float]]], loss: LossConfig) -> str:
    cols = columns(loss)
    header = ["Name", *(title for _, title in cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, metrics in rows:
        cells = [name]
        for key, _ in cols:
            value = metrics.get(key)
            cells.append("—" if value is None else (f"{value:.1%}" if key == ACCURACY else f"{value:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(rows: list[tuple[str, dict[str, float]]], loss: LossConfig, path: Path) -> Path:
    """One bar group per metric, one bar per model."""
    plt = _pyplot()
    cols = columns(loss)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.4))
    names = [name for name, _ in rows]
    for ax, (key, title) in zip(axes, cols):
        ax.bar(range(len(rows)), [m.get(key, float("nan")) for _, m in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file. A torn last line (its writer was killed mid-line) is dropped with a warning."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
            log.warning("%s: dropped its torn last line %r", path, line[:80])
    return records


def plot_training(metrics_path: Path, out_dir: Path, loss: LossConfig) -> list[Path]:
    """train vs eval curves of the loss, its terms and accuracy (`curves(loss)`) from metrics.jsonl."""
    plt = _pyplot()
    records = read_jsonl(metrics_path)
    paths = []
    for name, title in curves(loss):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, label in ((name, "train"), (f"eval_{name}", "eval")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if label == "eval" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        path = Path(out_dir) / f"{title.lower().replace(' ', '_').replace('.', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
