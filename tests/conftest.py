"""Shared fixtures: one offline asset cache per test session, the bundled tiny model and its data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_ORPO_CACHE", str(root))
        from vlm_orpo.assets import ensure_assets

        yield ensure_assets()


@pytest.fixture(scope="session")
def tiny_processor(asset_cache):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(asset_cache["tiny_model"])


@pytest.fixture(scope="session")
def tiny_pairs(asset_cache, tiny_processor):
    """Encoded pairs from the bundled train split, with different prompt and answer lengths."""
    from vlm_orpo.config import DataConfig
    from vlm_orpo.data.packing import PairEncoder, load_pairs

    encoder = PairEncoder(tiny_processor, max_answer_tokens=32)
    train, _, _ = load_pairs(DataConfig(source=asset_cache["train"]), encoder)
    return encoder, [train[i] for i in range(8)]


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run_cli(*args, env=None, timeout=900, module="vlm_orpo.cli", cwd=None):
    """Run `vlm-orpo ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=dict(env or os.environ), timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def quickstart_run(asset_cache, tmp_path_factory):
    """The README's quickstart, exactly as configured, into a temporary run directory."""
    run = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_cli("train", "--config", QUICKSTART, f"training.output_dir={run}")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return run, result.stdout
