"""Shared fixtures: one offline asset cache per test session, the bundled tiny model and its data."""

from __future__ import annotations

import os

import pytest
import torch

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


@pytest.fixture
def fp32_default():
    torch.manual_seed(0)
    yield
