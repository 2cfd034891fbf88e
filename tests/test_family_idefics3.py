"""Idefics3 and SmolVLM on the shared-prefix path, each as a tiny model built offline: image splitting into crops
plus a global image (pixel_values [1, crops + 1, 3, 64, 64] and pixel_attention_mask [1, crops + 1, 64, 64]), the
expanded prompt (<fake_token_around_image>, <row_i_col_j>, <global-img>), 1D positions.

Packed == plain on the sdpa and pairs backends (pair per row, padded rows, one row, with and without gradient
checkpointing), also with images of different sizes in one batch, so different crop counts: the collators pad the
crop dimension with all-zero crops, which the model drops, and a pair's log-probs do not depend on that padding.
The encoder's prompt length is the processor's; the pairs layout reaches the text attention only."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from equivalence import assert_equivalent, rel_err, with_rejected
from vlm_orpo.assets import ensure_tiny_model
from vlm_orpo.data.packing import PackedCollator, PairEncoder
from vlm_orpo.images import open_image
from vlm_orpo.modeling import attention
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.families import idefics3 as idefics3_family  # also lets AutoProcessor load without torchvision
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.plain import plain_pair_logps
from vlm_orpo.modeling.shared_prefix import attention_backend, packed_logps, set_attention_backend

FAMILIES = ["idefics3", "smolvlm"]
BACKENDS = ["sdpa", "pairs"]  # flex has no CPU backward
LAYOUTS = {"pair-per-row": 4, "padded-rows": 2, "one-row": 1}  # rows for 4 pairs
# (height, width) -> crops: the longest edge goes to 128, then 64x64 crops + a 64x64 global image
CROPS = {(128, 128): 5, (64, 128): 3, (128, 64): 3, (60, 200): 3, (90, 90): 5, (300, 290): 5, (300, 17): 3}
MIXED_SIZES = [(64, 128), (128, 128), (200, 60), (90, 90)]  # 3, 5, 3, 5 crops
QUESTION = "What colour is the shape?"
BOS = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}
IMAGE_SEQ_LEN = 16  # image tokens per crop: (64 / 8)^2 patches, pixel-shuffled by 2


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, asset_cache):
    """One family's tiny model dir, processor, encoder, 8 encoded pairs of the bundled data (128x128: 5 crops
    each), and 4 pairs whose images have other sizes (MIXED_SIZES: 3 or 5 crops)."""
    name = request.param
    path = ensure_tiny_model(name)
    processor = AutoProcessor.from_pretrained(path)
    encoder = PairEncoder(processor, max_answer_tokens=32)
    rows = pq.read_table(asset_cache["train"]).slice(0, 8).to_pylist()
    pairs = [encoder.encode(row) for row in rows]
    mixed = [encoder.encode(dict(row, image=open_image(row["image"]).resize((w, h))))
             for row, (h, w) in zip(rows, MIXED_SIZES)]
    return SimpleNamespace(name=name, path=path, processor=processor, encoder=encoder, pairs=pairs, mixed=mixed,
                           pad_id=encoder.tokenizer.pad_token_id, image_id=encoder.image_token_id)


def tiny(fam, backend="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(fam.path, dtype=torch.float32)
    set_attention_backend(model, backend)
    return model


def row_caps(pairs) -> dict:
    """max_tokens_per_row that packs 4 pairs into 4 rows, 2 rows, 1 row."""
    n = [len(p) for p in pairs]
    return {"pair-per-row": None, "padded-rows": max(n[0] + n[1], n[2] + n[3]), "one-row": sum(n)}


def check_rows(batch, layout):
    rows = batch["input_ids"].shape[0]
    assert rows == LAYOUTS[layout]
    if rows == 2:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


def crops(pair) -> int:
    return pair.image_inputs["pixel_values"].shape[1]


def test_assets_load_offline_with_the_familys_classes(fam):
    model = tiny(fam)
    expected = {"idefics3": ("Idefics3ForConditionalGeneration", "Idefics3ImageProcessor"),
                "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMImageProcessor")}[fam.name]
    assert type(model).__name__ == expected[0]
    assert type(fam.processor.image_processor).__name__.startswith(expected[1])
    # SmolVLMProcessor needs torchvision (its video processor) and num2words: both tiny models use Idefics3's,
    # which expands an image into the same prompt
    assert type(fam.processor).__name__ == "Idefics3Processor"
    assert fam.processor.image_seq_len == IMAGE_SEQ_LEN == model.model.image_seq_len
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 3e6
    assert model.config.text_config.initializer_range == 0.1


def test_family_entry_and_module_paths(fam):
    model = tiny(fam)
    family = family_for(model.config)
    assert family is getattr(idefics3_family, fam.name.upper())
    assert family.packed and set(family.backends) >= {"sdpa", "pairs"}
    modules = dict(model.named_modules())
    for path in (family.language_model, family.projector, family.vision_tower):
        assert path in modules, path
    assert modules[family.language_model] is model.model.text_model
    assert modules[family.vision_tower] is model.model.vision_model
    regex = lora_target_regex(model, family, "all-linear")
    targets = [n for n in modules if re.match(regex, n)]
    assert targets and all(n.startswith(family.language_model + ".") for n in targets)


def test_chat_template_and_answer_ids(fam):
    enc = fam.encoder
    assert enc.prompt_text(QUESTION) == f"{BOS[fam.name]}User:<image>{QUESTION}<end_of_utterance>\nAssistant:"
    ids = enc.answer_ids(QUESTION, "It is red.")
    assert enc.tokenizer.decode(ids) == " It is red.<end_of_utterance>"
    assert ids[-1] == enc.tokenizer.eos_token_id and ids.count(enc.tokenizer.eos_token_id) == 1
    chat = enc.messages(QUESTION) + [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    full = enc.tokenizer.apply_chat_template(chat, chat_template=fam.processor.chat_template, tokenize=False)
    assert full == f"{BOS[fam.name]}User:<image>{QUESTION}<end_of_utterance>\nAssistant: It is red.<end_of_utterance>\n"
    out = enc.tokenizer.apply_chat_template(chat, chat_template=fam.processor.chat_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert enc.tokenizer.decode(masked) == " It is red.<end_of_utterance>"
    # the BOS is written by the template, not added a second time
    pair = fam.pairs[0]
    assert pair.prompt_ids[0] == enc.tokenizer.bos_token_id and pair.prompt_ids.count(enc.tokenizer.bos_token_id) == 1


def test_expanded_image_prompt(fam):
    """2x2 crops + global: <fake><row_r_col_c> 16 x <image> per crop, a newline per row, a blank line, then
    <fake><global-img> 16 x <image><fake>; pixel_values [1, 5, 3, 64, 64] with a full pixel mask."""
    tok = fam.encoder.tokenizer
    pair = fam.pairs[0]
    assert pair.image_inputs["pixel_values"].shape == (1, 5, 3, 64, 64)
    assert pair.image_inputs["pixel_attention_mask"].shape == (1, 5, 64, 64)
    assert pair.image_inputs["pixel_attention_mask"].all()
    text = tok.decode(pair.prompt_ids)
    crop = "<image>" * IMAGE_SEQ_LEN
    image = ("<fake_token_around_image><row_1_col_1>" + crop + "<fake_token_around_image><row_1_col_2>" + crop + "\n"
             + "<fake_token_around_image><row_2_col_1>" + crop + "<fake_token_around_image><row_2_col_2>" + crop
             + "\n\n<fake_token_around_image><global-img>" + crop + "<fake_token_around_image>")
    assert text.startswith(f"{BOS[fam.name]}User:{image}") and text.endswith("?<end_of_utterance>\nAssistant:")
    assert pair.prompt_ids.count(fam.image_id) == 5 * IMAGE_SEQ_LEN
    for marker in ("<fake_token_around_image>", "<global-img>", "<row_2_col_2>"):  # control tokens, never split
        assert tok.convert_tokens_to_ids(marker) in pair.prompt_ids


@pytest.mark.parametrize("size", list(CROPS))
def test_prompt_length_is_the_processors(fam, size):
    """PairEncoder.prompt_length (Idefics3Processor._get_num_multimodal_tokens) == the real expanded prompt, for
    2x2 and 1x2 / 2x1 splits (the row count decides how many newlines there are)."""
    h, w = size
    row = {"idx": 0, "image": Image.new("RGB", (w, h), (200, 30, 30)), "question": QUESTION, "chosen": "red",
           "rejected": "blue"}
    pair = fam.encoder.encode(row)
    assert crops(pair) == CROPS[size]
    assert pair.prompt_ids.count(fam.image_id) == CROPS[size] * IMAGE_SEQ_LEN
    assert fam.encoder.prompt_length(QUESTION, size) == len(pair.prompt_ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_plain(fam, layout, backend):
    pairs = fam.pairs[:4]
    assert len({len(p) for p in pairs}) > 1, "the test needs pairs of different lengths"
    batch = assert_equivalent(tiny(fam, backend), pairs, fam.pad_id, fam.image_id, row_caps(pairs)[layout])
    check_rows(batch, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_rejected_per_prompt_equal_the_plain_forward(fam, backend):
    """[P, C, R1, R2, R3] groups, two a row: each answer sees only its prompt and itself."""
    groups = with_rejected(fam.pairs[:3], 3)
    batch = assert_equivalent(tiny(fam, backend), groups, fam.pad_id, fam.image_id, len(groups[0]) + len(groups[1]))
    assert batch["input_ids"].shape[0] == 2 and len(batch["meta"]) == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_plain_with_gradient_checkpointing(fam, backend):
    pairs = fam.pairs[4:8]
    batch = assert_equivalent(tiny(fam, backend), pairs, fam.pad_id, fam.image_id, row_caps(pairs)["padded-rows"],
                              gradient_checkpointing=True)
    check_rows(batch, "padded-rows")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded-rows", "one-row"])
def test_packed_equals_plain_with_different_crop_counts(fam, layout, backend):
    """Pairs of 3 and 5 crops in one batch: the collated pixel_values [4, 5, 3, 64, 64] hold all-zero crops for
    the 3-crop images (and a zero pixel mask there), which the model drops before the vision tower; the real
    crops' features land on the <image> tokens in row-major order (SmolVLM: block by block, offset per row), with
    two images a row or all four in one."""
    assert [crops(p) for p in fam.mixed] == [3, 5, 3, 5]
    batch = assert_equivalent(tiny(fam, backend), fam.mixed, fam.pad_id, fam.image_id, row_caps(fam.mixed)[layout])
    check_rows(batch, layout)
    pixels, mask = batch["images"]["pixel_values"], batch["images"]["pixel_attention_mask"]
    assert pixels.shape == (4, 5, 3, 64, 64) and mask.shape == (4, 5, 64, 64)
    padding = (pixels == 0).flatten(2).all(-1)
    assert padding.tolist() == [[False] * 3 + [True] * 2, [False] * 5] * 2
    assert not mask[padding].any() and mask[~padding].all()


def test_padding_crops_do_not_change_a_pair(fam):
    """A 3-crop pair alone (no padding) and batched with 5-crop pairs (2 padding crops) has the same log-probs,
    packed into one row and on the plain forward."""
    model = tiny(fam).eval()
    small, big = fam.mixed[0], fam.mixed[1]
    collate = PackedCollator(fam.pad_id, fam.image_id, max_tokens_per_row=10_000)
    with torch.no_grad():
        alone = packed_logps(model, collate([small]))
        batched = packed_logps(model, collate([big, small, fam.mixed[3]]))
        plain_alone = plain_pair_logps(model, [small], fam.pad_id)
        plain_batched = plain_pair_logps(model, [small, big], fam.pad_id)
    assert crops(small) == 3 and crops(big) == 5
    for field in ("chosen", "rejected"):
        assert rel_err(getattr(batched, field)[1], getattr(alone, field)[0]) <= 1e-5, field  # small is pair 1
        assert rel_err(getattr(plain_batched, field)[0], getattr(plain_alone, field)[0]) <= 1e-5, field
    assert rel_err(alone.chosen, plain_alone.chosen) <= 1e-5


def test_pair_layout_reaches_the_text_attention_only(fam, monkeypatch):
    """With pairs, every text attention call gets the layout; the vision tower stays on SDPA and never sees it."""
    model = tiny(fam, "pairs")
    assert attention_backend(model) == "pairs"
    assert model.config.get_text_config()._attn_implementation == attention.IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"
    calls = []
    for impl in (attention.IMPLEMENTATION, "sdpa"):
        real = ALL_ATTENTION_FUNCTIONS[impl]

        def spy(module, *args, _real=real, _impl=impl, **kwargs):
            calls.append((_impl, type(module).__name__, kwargs.get("pair_layout") is not None))
            return _real(module, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, impl, spy)
    batch = PackedCollator(fam.pad_id, fam.image_id, max_tokens_per_row=10_000)(fam.mixed[:3])
    with torch.no_grad():
        packed_logps(model, batch)
    text = [c for c in calls if c[0] == attention.IMPLEMENTATION]
    vision = [c for c in calls if c[0] == "sdpa"]
    assert len(text) == model.config.get_text_config().num_hidden_layers and all(c[2] for c in text)
    assert vision and not any(c[2] for c in vision)
    assert not {c[1] for c in text} & {c[1] for c in vision}
