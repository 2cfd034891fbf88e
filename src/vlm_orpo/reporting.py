"""Results tables in the seed's style, and the PNG plots of training curves and model comparisons."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# (metric name as `losses.pair_losses` gives it, column title): the results table and the curves.
COLUMNS = (
    ("loss", "ORPO loss (λ = {lam:g})"),
    ("nll_loss", "SFT loss"),
    ("or_loss", "OR loss"),
    ("rewards/accuracies", "Pref. accuracy"),
    ("rewards/margins", "Reward margin"),
    ("log_odds_chosen", "Log-odds"),
)
ACCURACY = "rewards/accuracies"
# (metric name, plot title): each plot has the train curve and the eval curve (`eval_` + name) of one metric
CURVES = (("loss", "ORPO loss"), ("nll_loss", "SFT loss"), ("or_loss", "OR loss"), (ACCURACY, "Preference accuracy"))


def results_table(rows: list[tuple[str, dict[str, float]]], orpo_lambda: float) -> str:
    header = ["Name", *(title.format(lam=orpo_lambda) for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, metrics in rows:
        cells = [name]
        for key, _ in COLUMNS:
            value = metrics.get(key)
            cells.append("—" if value is None else (f"{value:.1%}" if key == ACCURACY else f"{value:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(rows: list[tuple[str, dict[str, float]]], orpo_lambda: float, path: Path) -> Path:
    """One bar group per metric, one bar per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 3.4))
    names = [name for name, _ in rows]
    for ax, (key, title) in zip(axes, COLUMNS):
        ax.bar(range(len(rows)), [m.get(key, float("nan")) for _, m in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title.format(lam=orpo_lambda), fontsize=9)
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


def plot_training(metrics_path: Path, out_dir: Path) -> list[Path]:
    """train vs eval curves of ORPO, SFT and OR loss and accuracy from metrics.jsonl."""
    plt = _pyplot()
    records = read_jsonl(metrics_path)
    paths = []
    for name, title in CURVES:
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
