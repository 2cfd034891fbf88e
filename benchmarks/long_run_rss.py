"""Flat memory on a long run: `vlm-orpo train` on the bundled tiny model for 2,000 steps, RSS sampled every 100.

Runs the README's quickstart config (LLaVA-NeXT tiny model, synthetic data, evaluation and checkpoints on) with
`max_steps` set, in a fresh process, and watches it from outside: each time metrics.jsonl gains a training log
record (one every `--every` steps) it reads the training process's resident set size. Growth after the first
evaluation and checkpoint (when allocators and caches have settled) is what would betray a leak: it is reported
per 1,000 steps. Too slow for the test suite (about half an hour on 2 cores).

    python benchmarks/long_run_rss.py --json benchmarks/results/long-run-rss-cpu-DATE.json --plot docs/long_run_rss.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BUSY_EVERY = 500  # evaluation and checkpoint every this many steps, as a real run has them


def watch(command: list[str], metrics: Path, every: int, log: Path) -> list[dict]:
    """Run `command`; one RSS sample (MiB, the process and its children) per new training log record.

    Its output goes to a file: a pipe nobody reads fills up with the progress bar and blocks the run."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    watched = psutil.Process(proc.pid)
    samples, seen, start = [], 0, time.perf_counter()
    while proc.poll() is None:
        time.sleep(0.5)
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        for line in lines[seen:]:
            record = json.loads(line) if line.endswith("}") else {}
            if "loss" in record and "train_runtime" not in record and record["step"] % every == 0:
                try:
                    rss = sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)])
                except psutil.NoSuchProcess:
                    break
                samples.append({"step": record["step"], "rss_mib": round(rss / 2**20, 1),
                                "seconds": round(time.perf_counter() - start, 1)})
                print(f"step {record['step']:5d}  RSS {samples[-1]['rss_mib']:8.1f} MiB", flush=True)
        seen = len(lines) if not lines or lines[-1].endswith("}") else len(lines) - 1
    if proc.returncode:
        sys.exit(f"training failed (exit {proc.returncode}): {log.read_text()[-2000:]}")
    return samples


def growth_per_1000_steps(samples: list[dict], settled_from: int, busy_every: int) -> float:
    """Least-squares slope of RSS over steps, from `settled_from` on, in MiB per 1,000 steps.

    Samples at evaluation/checkpoint steps (multiples of `busy_every`) are left out of the fit: they catch the
    evaluation's or the save's buffers (about 20 MiB that are freed again) whenever the sample lands during them."""
    points = [(s["step"], s["rss_mib"]) for s in samples if s["step"] >= settled_from and s["step"] % busy_every]
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope * 1000


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s["step"] for s in samples], [s["rss_mib"] for s in samples], marker="o", markersize=3)
    ax.set(xlabel="training step", ylabel="RSS (MiB)", title=title)
    ax.set_ylim(0, max(s["rss_mib"] for s in samples) * 1.15)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="sample RSS every this many steps")
    parser.add_argument("--batch", type=int, default=1, help="pairs per step (a leak grows per step, not per pair)")
    parser.add_argument("--settled", type=int, default=600,
                        help="fit the growth from this step on (default: past the first evaluation and checkpoint)")
    parser.add_argument("--json", type=Path, help="write the samples here")
    parser.add_argument("--plot", type=Path, help="write the RSS curve here (PNG)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlm-orpo-long-run-") as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "vlm_orpo.cli", "train", "--config", str(QUICKSTART),
                   f"training.output_dir={run}", f"training.max_steps={args.steps}",
                   f"training.per_device_train_batch_size={args.batch}", f"training.logging_steps={args.every}",
                   f"training.eval_steps={BUSY_EVERY}", f"training.save_steps={BUSY_EVERY}",
                   "training.warmup_steps=50"]
        samples = watch(command, run / "metrics.jsonl", args.every, Path(tmp) / "train.log")
    settled = args.settled
    slope = growth_per_1000_steps(samples, settled, BUSY_EVERY)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "command": command[1:],
        "samples": samples,
        "rss_first_mib": samples[0]["rss_mib"],
        "rss_last_mib": samples[-1]["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        f"growth_mib_per_1000_steps_from_step_{settled}_between_evaluations": round(slope, 2),
    }
    print(f"RSS {result['rss_first_mib']} MiB at step {samples[0]['step']}, {result['rss_last_mib']} MiB at step "
          f"{samples[-1]['step']} (max {result['rss_max_mib']}); slope from step {settled}, between evaluations: "
          f"{slope:+.2f} MiB / 1000 steps")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(samples, args.plot, f"vlm-orpo train, tiny LLaVA-NeXT, {args.steps} steps on CPU")


if __name__ == "__main__":
    main()
