"""Row validation: parallel workers give the serial outcome, and a second run reads it from the cache, unless
anything that decides it changed."""

from __future__ import annotations

import pytest

from vlm_orpo.config import DataConfig
from vlm_orpo.data import validation
from vlm_orpo.data.packing import PairEncoder, load_pairs
from vlm_orpo.data.sources import prepare_data


@pytest.fixture
def data_copy(asset_cache, tmp_path, monkeypatch):
    """The bundled train split in a folder and a datasets cache of this test's own, so no other test shares it."""
    import shutil

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # read at load time
    path = tmp_path / "train.parquet"
    shutil.copy(asset_cache["train"], path)
    return str(path)


def outcomes_of(report, data):
    return report.summary(), list(data.indices)


def test_parallel_validation_equals_serial(data_copy, tiny_processor, monkeypatch):
    monkeypatch.setattr(validation, "PARALLEL_FROM_ROWS", 1)
    encoder = PairEncoder(tiny_processor, max_answer_tokens=8)  # some answers are cut: counted the same way
    calls = []
    real = validation._compute
    monkeypatch.setattr(validation, "_compute", lambda *a: calls.append(a[2]) or real(*a))
    serial = prepare_data(data_copy, check_tokens=encoder.check, num_proc=1)
    parallel = prepare_data(data_copy, check_tokens=encoder.check, num_proc=2, check_key=None)  # no key: not cached
    assert calls == [1, 2]
    assert outcomes_of(parallel.report, parallel.train) == outcomes_of(serial.report, serial.train)
    assert parallel.report.truncated["train"] > 0


def test_a_second_run_reads_the_cache_and_any_change_revalidates(data_copy, tiny_processor, monkeypatch):
    cfg = DataConfig(source=data_copy, validation_fraction=0.2, max_answer_tokens=8)
    computed = []
    real = validation._compute
    monkeypatch.setattr(validation, "_compute", lambda check, positions, n: computed.append(len(positions))
                        or real(check, positions, n))

    def run(cfg, encoder):
        train, val, report = load_pairs(cfg, encoder)
        return report.summary(), train.rows.indices, val.rows.indices

    first = run(cfg, PairEncoder(tiny_processor, max_answer_tokens=8))
    assert computed == [200, 800]
    assert run(cfg, PairEncoder(tiny_processor, max_answer_tokens=8)) == first and computed == [200, 800]
    changed = run(DataConfig(**{**cfg.__dict__, "max_answer_tokens": 64}), PairEncoder(tiny_processor, 64))
    assert computed == [200, 800, 200, 800] and changed[1:] == first[1:] and changed[0] != first[0]
    run(DataConfig(**{**cfg.__dict__, "max_image_pixels": 128 * 96}), PairEncoder(tiny_processor, max_answer_tokens=8))
    assert len(computed) == 6  # the image cap is part of the key too
