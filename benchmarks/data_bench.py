"""Data preparation at scale: row validation cold (parallel) and cached, for RLAIF-V-shaped data of N rows.

Builds an RLAIF-V-shaped parquet on the fly (JPEG images of RLAIF-V-like sizes, answers of RLAIF-V-like
lengths), then, in a fresh process per size (so peak RSS is that size's own), validates it with the bundled tiny
model's encoder twice: cold (an empty datasets cache: Arrow conversion plus validation) and again (the cached
outcome). With `--streaming`, it reads the same file as `data.streaming` does instead: the time to the first
training pair and the rate and peak RSS over the first `--pairs` pairs (validated and encoded, through the
default shuffle buffer). Prints a table and writes JSON.

    python benchmarks/data_bench.py --rows 5000 10000 20000 --json benchmarks/results/data-cpu-DATE.json
    python benchmarks/data_bench.py --streaming --json benchmarks/results/data-streaming-cpu-DATE.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(448, 448), (640, 480), (800, 600), (1024, 768), (512, 683)]  # RLAIF-V's images are mostly 400-1000 px
WORDS = "the a image shows person table red blue left right small large there is are with on of near".split()


def build_parquet(path: Path, rows: int, seed: int = 0) -> None:
    """RLAIF-V's columns; 64 distinct JPEGs reused (their decode cost is what matters, not their pixels)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    images = []
    for i in range(64):
        w, h = SIZES[i % len(SIZES)]
        gradient = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)
        buffer = io.BytesIO()
        Image.fromarray(gradient ^ np.uint8(i * 3)).save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())

    def answer(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    def rows_of(start, n):
        return {
            "idx": list(range(start, start + n)),
            "image": [{"bytes": images[(start + i) % 64], "path": None} for i in range(n)],
            "question": [f"Describe the image in detail. ({start + i})" for i in range(n)],
            "chosen": [answer(rng.randint(40, 160)) for _ in range(n)],
            "rejected": [answer(rng.randint(40, 160)) for _ in range(n)],
        }

    features = datasets.Features({"idx": datasets.Value("int64"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string")})
    datasets.Dataset.from_dict(rows_of(0, rows), features=features).to_parquet(str(path))


def peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM, which exec resets. (getrusage's ru_maxrss keeps the high-water mark of
    the process before exec, here the parent that built the parquet: an earlier version of this script reported
    that, so its peak RSS grew with the rows whatever the measured code did.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(path: str, num_proc: int | None) -> dict:
    """In this process: cold then cached validation of `path` with the tiny model's encoder."""
    from transformers import AutoProcessor

    from vlm_orpo.assets import ensure_assets
    from vlm_orpo.data.packing import PairEncoder
    from vlm_orpo.data.sources import prepare_data

    encoder = PairEncoder(AutoProcessor.from_pretrained(ensure_assets()["tiny_model"]), max_answer_tokens=128)
    timings = {}
    for run in ("cold", "cached"):
        start = time.perf_counter()
        data = prepare_data(path, check_tokens=encoder.check, check_key=encoder.cache_key, num_proc=num_proc)
        timings[run] = time.perf_counter() - start
    return {"rows": len(data.train), "summary": data.report.summary(), "cold_s": timings["cold"],
            "cached_s": timings["cached"], "peak_rss_mib": peak_rss_mib()}


def measure_stream(path: str, pairs: int) -> dict:
    """In this process: open `path` as `data.streaming` does and take `pairs` training pairs from it."""
    from transformers import AutoProcessor

    from vlm_orpo.assets import ensure_assets
    from vlm_orpo.config import DataConfig
    from vlm_orpo.data.packing import PairEncoder, load_pairs

    encoder = PairEncoder(AutoProcessor.from_pretrained(ensure_assets()["tiny_model"]), max_answer_tokens=128)
    start = time.perf_counter()
    stream = iter(load_pairs(DataConfig(source=path, streaming=True), encoder)[0])
    next(stream)
    first = time.perf_counter() - start
    for _ in range(pairs - 1):
        last = next(stream)
    seconds = time.perf_counter() - start
    return {"first_pair_s": first, "pairs": pairs, "pairs_per_s": pairs / seconds, "rows_read": last.stream_state[1].read,
            "peak_rss_mib": peak_rss_mib()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--num-proc", type=int, default=None, help="validation processes (default: the cores)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--streaming", action="store_true", help="measure data.streaming instead")
    parser.add_argument("--pairs", type=int, default=1000, help="with --streaming: training pairs to take")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this parquet in this process
    args = parser.parse_args()
    if args.measure:
        result = measure_stream(args.measure, args.pairs) if args.streaming else measure(args.measure, args.num_proc)
        print(json.dumps(result))
        return 0
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d")}, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="vlm-orpo-data-bench-") as tmp:
        for n in args.rows:
            path = Path(tmp) / f"rlaifv-{n}.parquet"
            build_parquet(path, n)
            env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / f"hf-cache-{n}"), HF_HUB_OFFLINE="1")
            cmd = [sys.executable, __file__, "--measure", str(path), "--pairs", str(args.pairs)] + (
                ["--num-proc", str(args.num_proc)] if args.num_proc else []) + (["--streaming"] if args.streaming else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            entry = {"rows_in": n, "parquet_mib": path.stat().st_size / 2**20, **json.loads(out.stdout.splitlines()[-1])}
            results["sizes"].append(entry)
            if args.streaming:
                print(f"{n:>6} rows streamed: first pair {entry['first_pair_s']:.2f} s, {entry['pairs_per_s']:.0f} "
                      f"pairs/s, peak RSS {entry['peak_rss_mib']:.0f} MiB", flush=True)
            else:
                entry["speedup"] = entry["cold_s"] / entry["cached_s"]
                print(f"{n:>6} rows: cold {entry['cold_s']:.1f} s ({n / entry['cold_s']:.0f} rows/s), cached "
                      f"{entry['cached_s']:.2f} s ({entry['speedup']:.0f}x), peak RSS {entry['peak_rss_mib']:.0f} MiB",
                      flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
