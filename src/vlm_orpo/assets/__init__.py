"""Offline assets: tiny random models of each supported family and a synthetic visual preference dataset.

All are generated deterministically from a fixed seed (no download) and cached under `cache_root` on first
use::

    from vlm_orpo.assets import ensure_assets, ensure_tiny_model
    paths = ensure_assets()
    paths["tiny_model"], paths["train"], paths["validation"]   # the tiny LLaVA-NeXT and the data
    ensure_tiny_model("qwen2_5_vl")                            # another family's tiny model, built on demand

A config names them as `model.name_or_path: bundled` (LLaVA-NeXT) or `bundled:FAMILY` (`TINY_MODELS`).
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from vlm_orpo.assets.synthetic import build_synthetic_data, score_answer
from vlm_orpo.assets.tiny_model import build_tiny_model

__all__ = [
    "ASSETS_VERSION",
    "HELP",
    "add_arguments",
    "build_synthetic_data",
    "build_tiny_model",
    "cache_root",
    "ensure_assets",
    "ensure_tiny_model",
    "TINY_MODELS",
    "run",
    "score_answer",
]

# Bump when the generators change, so stale caches are rebuilt under a new folder.
ASSETS_VERSION = "assets-v9"
SEED = 0
TINY_MODEL_DIRNAME = "tiny-llava-next"
SYNTHETIC_DIRNAME = "synthetic"
DEFAULT_TINY_MODEL = "llava_next"
# family -> "module:function" under vlm_orpo.assets; the function builds the tiny model into a directory from a seed
TINY_MODELS = {
    "llava_next": "tiny_model:build_tiny_model",
    "llava_onevision": "tiny_llava_like:build_llava_onevision",
    "internvl": "tiny_llava_like:build_internvl",
    "mistral3": "tiny_llava_like:build_mistral3",
    "qwen2_vl": "tiny_qwen:build_qwen2_vl",
    "qwen2_5_vl": "tiny_qwen:build_qwen2_5_vl",
    "qwen3_vl": "tiny_qwen:build_qwen3_vl",
    "qwen3_vl_moe": "tiny_qwen:build_qwen3_vl_moe",
    "gemma3": "tiny_gemma3:build_gemma3",
    "gemma4": "tiny_gemma4:build_gemma4",
    "idefics3": "tiny_idefics3:build_idefics3",
    "smolvlm": "tiny_idefics3:build_smolvlm",
}


def cache_root() -> Path:
    """`$VLM_ORPO_CACHE` if set, else `~/.cache/vlm-orpo`."""
    env = os.environ.get("VLM_ORPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm-orpo"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _paths(base: Path) -> dict[str, Path]:
    syn = base / SYNTHETIC_DIRNAME
    return {
        "tiny_model": base / TINY_MODEL_DIRNAME,
        "train": syn / "train.parquet",
        "validation": syn / "validation.parquet",
    }


def _model_ready(model_dir: Path) -> bool:
    # Directories are renamed into place only when complete; the marker is a cheap sanity check.
    return (model_dir / "vlm_orpo_asset.json").is_file() and (model_dir / "model.safetensors").is_file()


def _data_ready(paths: dict[str, Path]) -> bool:
    return paths["train"].is_file() and paths["validation"].is_file()


def ensure_assets(root: Path | None = None) -> dict[str, str]:
    """Return `{"tiny_model": DIR, "train": PATH, "validation": PATH}` (absolute strings).

    Builds whatever is missing under `<root>/assets-v9/` (`root` defaults to
    `cache_root`). Concurrent callers are serialised by an `flock` on
    `<root>/assets-v9.lock`; builds are atomic, so readers never see partial files.
    """
    root = Path(root).expanduser() if root is not None else cache_root()
    root = root.absolute()
    base = root / ASSETS_VERSION
    paths = _paths(base)

    if not (_model_ready(paths["tiny_model"]) and _data_ready(paths)):
        with _file_lock(root / f"{ASSETS_VERSION}.lock"):
            # Builds only run under this lock, so temp dirs found now are from killed builds.
            if base.is_dir():
                for stale in [*base.glob(".*.tmp-*"), *base.glob(".*.old-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
            # Re-check: another process may have finished the build while we waited.
            if not _model_ready(paths["tiny_model"]):
                build_tiny_model(paths["tiny_model"], seed=SEED)
            if not _data_ready(paths):
                build_synthetic_data(base / SYNTHETIC_DIRNAME, seed=SEED)
    return {k: str(v) for k, v in paths.items()}


def ensure_tiny_model(name: str, root: Path | None = None) -> str:
    """The tiny model of family `name` (a key of `TINY_MODELS`), built under the asset cache if missing."""
    if name not in TINY_MODELS:
        raise ValueError(f"no bundled tiny model {name!r}; there are: {', '.join(TINY_MODELS)}")
    if name == DEFAULT_TINY_MODEL:
        return ensure_assets(root)["tiny_model"]
    root = (Path(root).expanduser() if root is not None else cache_root()).absolute()
    model_dir = root / ASSETS_VERSION / f"tiny-{name.replace('_', '-')}"
    if not _model_ready(model_dir):
        with _file_lock(root / f"{ASSETS_VERSION}.lock"):
            if not _model_ready(model_dir):
                module, function = TINY_MODELS[name].split(":")
                getattr(importlib.import_module(f"{__name__}.{module}"), function)(model_dir, seed=SEED)
    return str(model_dir)


HELP = "build (if needed) and show the bundled tiny models and synthetic data"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true",
                        help='print {"tiny_model": DIR, "train": PATH, "validation": PATH, "tiny_models": {FAMILY: DIR}}')


def run(args) -> None:
    """`vlm-orpo assets`: builds every bundled tiny model (each family's takes seconds) and the data."""
    import json

    paths = {**ensure_assets(), "tiny_models": {name: ensure_tiny_model(name) for name in TINY_MODELS}}
    if args.json:
        print(json.dumps(paths))
        return
    print("Bundled assets (built on first use, offline):")
    for name in ("tiny_model", "train", "validation"):
        print(f"  {name:<11} {paths[name]}")
    for name, path in paths["tiny_models"].items():
        print(f"  {'bundled:' + name:<22} {path}")
