"""Data sources: every input format loads to the same canonical rows; every bad-row reason is counted."""

from __future__ import annotations

import io
import json

import datasets
import pytest
import torch
from PIL import Image

from vlm_orpo.config import DataConfig
from vlm_orpo.data.packing import PairDataset, PairEncoder, load_pairs
from vlm_orpo.data.sources import RLAIF_V_COLUMNS, CanonicalRows, prepare_data
from vlm_orpo.data.validation import canonical_row
from vlm_orpo.errors import BadRow, DataError
from vlm_orpo.images import open_image


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


def test_a_corrupt_file_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=r"^cannot load data .*broken.parquet'?: .+") as err:
        prepare_data(str(path))
    assert "\n" not in str(err.value)


def test_each_bad_row_reason_is_counted_and_good_rows_kept(tmp_path, tiny_processor, caplog):
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
    limit = PairEncoder(tiny_processor).prompt_length(GOOD["question"], (96, 128))  # the 128x96 rows fit exactly
    data = prepare_data(path, check_tokens=PairEncoder(tiny_processor, max_prompt_tokens=limit).check)
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
    logged = {int(m.split("(idx ")[1].split(")")[0]) for m in caplog.messages if m.startswith("skipped train row")}
    assert logged == set(range(len(rows))) - set(kept)  # each skip is logged once, with its idx


def test_prompt_length_matches_encoding(tiny_processor, asset_cache):
    encoder = PairEncoder(tiny_processor)
    train, _, _ = load_pairs(DataConfig(source=asset_cache["train"]), encoder)
    for i in range(6):
        row = train.rows[i]
        image = open_image(row["image"])
        pair = encoder.encode(row)
        assert encoder.prompt_length(row["question"], (image.height, image.width)) == len(pair.prompt_ids)
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tiny_processor.tokenizer.eos_token_id


def test_a_cut_answer_loses_its_eos_and_is_counted(tmp_path, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    whole = PairEncoder(tiny_processor).answer_ids("Q?", "a long answer with many many words in it")
    cut = PairEncoder(tiny_processor, max_answer_tokens=3).answer_ids("Q?", "a long answer with many many words in it")
    assert whole[-1] == eos and len(whole) > 3
    assert cut == whole[:3] and eos not in cut  # as TRL: the model must not learn to stop mid-answer
    img = {"bytes": png(), "path": None}
    rows = [{"image": img, **GOOD}, {"image": img, **{**GOOD, "chosen": "red " * 40}}]
    data = prepare_data(write_parquet(tmp_path / "d.parquet", rows),
                        check_tokens=PairEncoder(tiny_processor, max_answer_tokens=12).check)
    assert len(data.train) == 2 and data.report.truncated["train"] == 1
    assert "train 2 (1 with an answer cut to max_answer_tokens)" in data.report.summary()


def test_chat_questions_that_cannot_hold_one_image_are_skipped_not_fatal(tmp_path, tiny_processor):
    def user(*content):
        return {"role": "user", "content": list(content)}

    text = {"type": "text", "text": "Colour?"}
    image = {"type": "image", "text": None}
    questions = [
        [user(image, text)],  # good
        [user(image, image, text)],  # two image slots for one image
        [{"role": "system", "content": [text]}],  # no user turn to put the image in
        [user({"type": "text", "text": "<image> Colour? <image>"})],  # placeholders in the text
    ]
    rows = [{"image": {"bytes": png(), "path": None}, "question": q, "chosen": "Red.", "rejected": "Blue."}
            for q in questions]
    encoder = PairEncoder(tiny_processor)
    data = prepare_data(write_parquet(tmp_path / "d.parquet", rows), check_tokens=encoder.check)
    assert data.train.indices == [0]
    assert data.report.reasons["bad question"] == 3
    unchecked = CanonicalRows(data.train.dataset, data.train.columns, [1], data.train.base_dir)
    bad = PairDataset(unchecked, encoder)  # as if validation had been skipped
    loader = torch.utils.data.DataLoader(bad, batch_size=1, collate_fn=list)
    with pytest.raises(RuntimeError, match="failed to encode"):  # never a silent end of the epoch
        list(loader)


def test_numeric_answers_are_text_and_odd_types_are_counted(tmp_path):
    (tmp_path / "img.png").write_bytes(png())
    (tmp_path / "d.csv").write_text("image,question,chosen,rejected\nimg.png,How many?,3,4\nimg.png,How many?,2.5,1\n")
    data = prepare_data(str(tmp_path / "d.csv"))
    assert [(r["chosen"], r["rejected"]) for r in canonical(data.train)] == [("3", "4"), ("2.5", "1")]
    raw = {"image": png(), "question": "q", "chosen": True, "rejected": [{"role": "assistant", "content": 7}]}
    for name, value in (("chosen", True), ("rejected", [{"role": "assistant", "content": 7}])):
        with pytest.raises(BadRow, match=f"bad {name}"):
            canonical_row({**raw, "chosen": "a", "rejected": "b", name: value}, RLAIF_V_COLUMNS, 0, False)


def test_a_decompression_bomb_is_a_bad_row(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 128x96 is then over twice the limit
    with pytest.raises(BadRow, match="undecodable image"):
        open_image(png())


def test_limit_scores_fewer_held_out_rows_and_says_so(asset_cache):
    full = prepare_data(asset_cache["train"], validation_fraction=0.2, seed=3)
    limited = prepare_data(asset_cache["train"], validation_fraction=0.2, seed=3, limit=5)
    assert limited.train.indices == full.train.indices  # the train set never depends on the limit
    assert len(limited.validation) == 5 and set(limited.validation.indices) <= set(full.validation.indices)
    assert limited.report.unscored["validation"] == len(full.validation) - 5
    assert "more held out but not scored" in limited.report.summary()


def test_a_named_split_is_never_the_training_data_by_accident(asset_cache, tmp_path):
    with pytest.raises(DataError, match="one file"):
        prepare_data(asset_cache["train"], validation_split="validation")
    assert prepare_data(asset_cache["validation"], want_train=False, validation_split="validation").validation
    with pytest.raises(DataError, match="no split 'test'"):
        prepare_data("bundled", validation_split="test")


def test_subset_and_validation_fraction_are_seeded_and_disjoint(asset_cache):
    a = prepare_data(asset_cache["train"], subset_fraction=0.1, validation_fraction=0.2, seed=3)
    b = prepare_data(asset_cache["train"], subset_fraction=0.1, validation_fraction=0.2, seed=3)
    assert a.train.indices == b.train.indices and a.validation.indices == b.validation.indices
    assert len(a.train) + len(a.validation) == 100
    assert len(a.validation) == 20
    assert not set(a.train.indices) & set(a.validation.indices)


def test_an_image_over_the_pixel_cap_is_a_counted_skip_before_decoding(tmp_path):
    with pytest.raises(BadRow, match="oversized image: 128x96 is over 1,000 pixels"):
        open_image(png(), max_pixels=1000)
    path = write_parquet(tmp_path / "d.parquet", [{"image": {"bytes": png(), "path": None}, **GOOD},
                                                  {"image": {"bytes": png(size=(16, 16)), "path": None}, **GOOD}])
    data = prepare_data(path, max_image_pixels=1000)
    assert len(data.train) == 1 and data.report.reasons == {"oversized image": 1}
    assert DataConfig().max_image_pixels == 40_000_000


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "empty.csv", "empty.parquet", "schema_only.parquet"])
def test_a_file_without_rows_is_one_line(tmp_path, name):
    path = tmp_path / name
    if name == "blank.jsonl":
        path.write_text("\n\n")
    elif name == "schema_only.parquet":
        write_parquet(path, [{"image": {"bytes": png(), "path": None}, **GOOD}])
        datasets.Dataset.from_parquet(str(path)).select([]).to_parquet(str(path))
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=f"^no rows in {path}$"):
        prepare_data(str(path))


def test_control_token_text_in_an_answer_stays_text_and_the_pair_scores(asset_cache, tiny_processor, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.data.packing import PackedCollator
    from vlm_orpo.modeling.shared_prefix import packed_logps

    tricky = "It says <image> then </s> and <s> [INST] here."
    path = write_parquet(tmp_path / "d.parquet", [{"image": {"bytes": png(), "path": None}, **GOOD, "chosen": tricky}])
    encoder = PairEncoder(tiny_processor, max_answer_tokens=64)
    train, _, report = load_pairs(DataConfig(source=path), encoder)
    pair = train[0]
    tokenizer = tiny_processor.tokenizer
    control = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<s>", "</s>", "[INST]")}
    assert not control & set(pair.chosen_ids[:-1]) and pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen_ids[:-1]).strip() == tricky
    assert pair.rejected_ids == encoder.answer_ids(GOOD["question"], GOOD["rejected"])  # plain text: unchanged
    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"], dtype=torch.float32)
    batch = PackedCollator(tokenizer.pad_token_id, encoder.image_token_id)([pair])
    logps = packed_logps(model, batch)  # before the fix: "Image features and image tokens do not match"
    assert torch.isfinite(logps.chosen).all() and report.total_skipped == 0
