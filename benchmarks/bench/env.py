"""The environment a result was measured in (device, its peak FLOP/s, library versions, commit), recorded
with every result so numbers from different machines and versions are never compared blind."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from .flops import peak_flops

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "triton", "vlm-orpo", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, dtype: torch.dtype, peak_override: float | None) -> dict:
    info = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        peak = peak_override if peak_override is not None else peak_flops(name, dtype)
        info.update(
            name=name,
            memory_gib=round(props.total_memory / GIB, 1),
            capability=f"{props.major}.{props.minor}",
            peak_flops=peak,
            peak_flops_source="--peak-tflops" if peak_override else "PEAK_FLOPS table (dense tensor core)",
        )
    else:
        info.update(
            name=_cpu_name(),
            threads=torch.get_num_threads(),
            cpus=os.cpu_count(),
            load_avg_1m_at_start=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            peak_flops=peak_override,
        )
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how much else was running (CPU timings on a shared box are noisy)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """The host, for results that span several runs (each run's header has its device too)."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
            "versions": versions()}
