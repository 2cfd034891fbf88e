"""Data sources: every input format loads to the same canonical rows; every bad-row reason is counted."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from PIL import Image

from vlm_orpo.config import DataConfig
from vlm_orpo.data.packing import PairEncoder, load_pairs
from vlm_orpo.data.sources import DataError, open_image, prepare_data


def png(color=(200, 30, 30), size=(128, 96), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {"question": "What colour is the shape?", "chosen": "The shape is red.", "rejected": "The shape is blue."}


def write_parquet(path, rows, image_feature=True):
    ds = datasets.Dataset.from_list(rows)
    if image_feature and "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(path))
    return str(path)


def canonical(rows):
    return [rows[i] for i in range(len(rows))]


def test_rlaif_v_schema_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"image": {"bytes": png(), "path": None}, "idx": 7, **GOOD}])
    data = prepare_data(path)
    [row] = canonical(data.train)
    assert row["idx"] == 7 and row["question"] == GOOD["question"] and row["chosen"] == GOOD["chosen"]
    assert open_image(row["image"]).size == (128, 96)
    assert data.report.total_skipped == 0


def test_trl_schema_plain_strings_jsonl_with_relative_image_path(tmp_path):
    (tmp_path / "img.png").write_bytes(png())
    line = {"images": ["img.png"], "prompt": "Describe it.", "chosen": "A red square.", "rejected": "A blue circle."}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    data = prepare_data(str(tmp_path / "d.jsonl"))
    [row] = canonical(data.train)
    assert row["question"] == "Describe it." and row["rejected"] == "A blue circle."
    assert row["idx"] == 0  # no idx column: the row number
    assert open_image(row["image"], data.train.base_dir).mode == "RGB"


def test_trl_conversational_schema(tmp_path, tiny_processor):
    rows = [
        {
            "images": [{"bytes": png(), "path": None}],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
            "rejected": [{"role": "assistant", "content": "Blue."}],
        }
    ]
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    data = prepare_data(str(tmp_path / "d.parquet"))
    [row] = canonical(data.train)
    assert row["chosen"] == "Red." and row["rejected"] == "Blue."
    assert isinstance(row["question"], list) and row["question"][0]["role"] == "user"
    pair = PairEncoder(tiny_processor).encode(row)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert pair.prompt_ids.count(image_id) == 268  # one 128x96 image, expanded once
    assert tiny_processor.tokenizer.decode(pair.chosen_ids).strip() == "Red.</s>"


def test_columns_mapping_and_dataset_directory(tmp_path):
    rows = [{"img": {"bytes": png(), "path": None}, "q": "Q?", "good": "yes it is", "bad": "no it is not"}]
    ds = datasets.Dataset.from_list(rows).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "dir"))
    mapping = {"image": "img", "question": "q", "chosen": "good", "rejected": "bad"}
    data = prepare_data(str(tmp_path / "dir"), columns=mapping)
    assert canonical(data.train)[0]["chosen"] == "yes it is"


def test_missing_column_is_one_clear_error(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"image": {"bytes": png(), "path": None}, "question": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"missing column: rejected.*data.columns"):
        prepare_data(path)


def test_wrong_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        prepare_data(str(tmp_path / "nope.parquet"))


def test_each_bad_row_reason_is_counted_and_good_rows_kept(tmp_path, tiny_processor):
    img = {"bytes": png(), "path": None}
    rows = [
        {"image": img, "idx": 0, **GOOD},
        {"image": {"bytes": b"not a png at all", "path": None}, "idx": 1, **GOOD},
        {"image": img, "idx": 2, **{**GOOD, "chosen": "   "}},
        {"image": img, "idx": 3, **{**GOOD, "rejected": GOOD["chosen"]}},
        {"image": img, "idx": 4, **{**GOOD, "question": None}},
        {"image": {"bytes": png(mode="L"), "path": None}, "idx": 5, **GOOD},  # greyscale: converted
        {"image": None, "idx": 6, **GOOD},
        {"image": {"bytes": png(size=(128, 128)), "path": None}, "idx": 7, **GOOD},  # more image tokens
    ]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    encoder = PairEncoder(tiny_processor)
    limit = encoder.prompt_length(GOOD["question"], (96, 128))  # the 128x96 rows fit exactly
    data = prepare_data(path, prompt_length=encoder.prompt_length, max_prompt_tokens=limit)
    kept = [r["idx"] for r in canonical(data.train)]
    reasons = data.report.reasons
    assert reasons["undecodable image"] == 1
    assert reasons["empty chosen"] == 1
    assert reasons["chosen identical to rejected"] == 1
    assert reasons["missing question"] == 1
    assert reasons["missing image"] == 1
    assert reasons["prompt too long"] == 1
    assert kept == [0, 5]
    assert sum(reasons.values()) + len(kept) == len(rows)  # nothing lost without a count
    assert {r[2] for r in data.report.rows} == set(range(len(rows))) - set(kept)


def test_prompt_length_matches_encoding(tiny_processor, asset_cache):
    encoder = PairEncoder(tiny_processor, max_answer_tokens=8)
    train, _, _ = load_pairs(DataConfig(source=asset_cache["train"]), encoder)
    for i in range(6):
        row = train.rows[i]
        image = open_image(row["image"])
        pair = encoder.encode(row)
        assert encoder.prompt_length(row["question"], (image.height, image.width)) == len(pair.prompt_ids)
        assert pair.chosen_ids[-1] == tiny_processor.tokenizer.eos_token_id
        assert len(pair.chosen_ids) <= 8 + 1


def test_answer_cap_keeps_eos(tiny_processor):
    encoder = PairEncoder(tiny_processor, max_answer_tokens=3)
    ids = encoder.answer_ids("Q?", "a long answer with many many words in it")
    assert len(ids) == 4 and ids[-1] == tiny_processor.tokenizer.eos_token_id


def test_subset_and_validation_fraction_are_seeded_and_disjoint(asset_cache):
    a = prepare_data(asset_cache["train"], subset_fraction=0.1, validation_fraction=0.2, seed=3)
    b = prepare_data(asset_cache["train"], subset_fraction=0.1, validation_fraction=0.2, seed=3)
    assert a.train.indices == b.train.indices and a.validation.indices == b.validation.indices
    assert len(a.train) + len(a.validation) == 100
    assert len(a.validation) == 20
    assert not set(a.train.indices) & set(a.validation.indices)
