"""The README's quickstart on every bundled tiny family: does each one learn the colours on CPU?

Runs `vlm-orpo train --config configs/quickstart.yaml model.name_or_path=bundled:FAMILY` (plus any overrides),
one family after another in fresh processes, and records the held-out preference accuracy at every evaluation,
the wall time and whether the last evaluation reaches the target. Too slow for the test suite (about two
minutes a family on 2 cores); the suite trains each family a few steps through the same command instead.

    python benchmarks/family_quickstarts.py --json benchmarks/results/family-quickstarts-cpu-DATE.json
    python benchmarks/family_quickstarts.py --families qwen2_5_vl gemma3 --set training.num_train_epochs=4
    python benchmarks/family_quickstarts.py --families gemma3 --seeds 42 1 2 3 4   # how much one run's luck matters
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

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TARGET = 0.85  # issue 12: held-out accuracy above 85% on the questions it trains on


def run_family(family: str, overrides: list[str], out: Path, seed: int | None = None) -> dict:
    """Train one family through the CLI (at training seed `seed`, else the config's); its eval accuracies by step,
    wall time and exit code."""
    run = out / f"{family}-{seed}"
    seeded = [] if seed is None else [f"training.seed={seed}"]
    command = [sys.executable, "-m", "vlm_orpo.cli", "train", "--config", str(QUICKSTART),
               f"model.name_or_path=bundled:{family}", f"training.output_dir={run}", *overrides, *seeded]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"family": family, "seed": seed, "returncode": result.returncode,
                "error": result.stderr.strip().splitlines()[-1:]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [(r["step"], r["eval_rewards/accuracies"]) for r in records if "eval_rewards/accuracies" in r]
    forward = next((line for line in result.stdout.splitlines() if line.startswith("forward:")), "")
    return {"family": family, "seed": seed, "returncode": 0, "seconds": round(seconds, 1), "forward": forward,
            "accuracy_by_step": accuracy, "final_accuracy": accuracy[-1][1], "reaches_target": accuracy[-1][1] >= TARGET}


def main() -> None:
    from vlm_orpo.assets import TINY_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(TINY_MODELS), choices=list(TINY_MODELS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[None], metavar="SEED",
                        help="train each family once per training seed (default: once, at the config's seed)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="vlm-orpo-family-quickstarts-") as tmp:
        for family in args.families:
            for seed in args.seeds:
                results.append(run_family(family, args.set, Path(tmp), seed))
                r, label = results[-1], family if seed is None else f"{family} seed {seed}"
                if r["returncode"]:
                    print(f"{label:24s} failed: {r['error']}", flush=True)
                else:
                    curve = " ".join(f"{a:.2f}" for _, a in r["accuracy_by_step"])
                    print(f"{label:24s} {r['seconds']:6.0f} s  accuracy by eval: {curve}  "
                          f"{'>=' if r['reaches_target'] else '<'} {TARGET}", flush=True)
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        lowest = {f: min((r.get("final_accuracy", 0.0) for r in results if r["family"] == f)) for f in args.families}
        payload = {"config": str(QUICKSTART.relative_to(ROOT)), "overrides": args.set, "seeds": args.seeds,
                   "target": TARGET, "date": time.strftime("%Y-%m-%d"), "machine": machine,
                   "lowest_final_accuracy": lowest, "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
