"""Gemma 3 on the shared-prefix path, as a tiny model built offline (`bundled:gemma3`): image tokens attend to each
other both ways inside their block (`token_type_ids`), and the sliding-attention layer sees only a window.

The packed masks are the model's own for each pair's [prompt, chosen] and [prompt, rejected]; packed == plain
(log-probs, loss, every LoRA gradient) with a pair per row, padded rows and one row, with and without gradient
checkpointing, for the builder's window (24, cutting into the image block) and a window of 8 (only the question's
end). Dropping either rule (the window in row indices instead of restarted positions, or no image blocks) makes
packed differ from plain, so the equivalence tests see both. Only sdpa is exact: auto picks it, pairs and flex are
one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from equivalence import assert_equivalent, rel_err, with_rejected
from vlm_orpo.assets import ensure_tiny_model
from vlm_orpo.assets.tiny_gemma3 import IMAGE_SIZE, LAYER_TYPES, MM_TOKENS_PER_IMAGE, SLIDING_WINDOW, build_gemma3
from vlm_orpo.config import ModelConfig
from vlm_orpo.data.packing import PackedCollator, PairEncoder
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.families import gemma3 as gemma3_family
from vlm_orpo.modeling.load import load_base_model, load_processor
from vlm_orpo.modeling.plain import plain_pair_logps
from vlm_orpo.modeling.shared_prefix import packed_logps, resolve_backend, set_attention_backend

WINDOWS = [SLIDING_WINDOW, 8]
LAYOUTS = {"pair-per-row": 4, "padded-rows": 2, "one-row": 1}  # rows for 4 pairs
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def g3(asset_cache):
    """The tiny model dir, processor, encoder and 8 encoded pairs of the bundled data (lengths 96..110)."""
    path = ensure_tiny_model("gemma3")
    processor = AutoProcessor.from_pretrained(path)
    encoder = PairEncoder(processor, max_answer_tokens=32)
    rows = pq.read_table(asset_cache["train"]).slice(0, 8).to_pylist()
    return SimpleNamespace(path=path, processor=processor, encoder=encoder, pairs=[encoder.encode(r) for r in rows],
                           pad_id=encoder.tokenizer.pad_token_id, image_id=encoder.image_token_id)


def tiny(g3, sliding_window: int = SLIDING_WINDOW):
    """The tiny model on sdpa, its text config's window set to `sliding_window` (read when masks are built)."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(g3.path, dtype=torch.float32)
    set_attention_backend(model, "sdpa")
    model.config.get_text_config().sliding_window = sliding_window
    assert model.model.language_model.config.sliding_window == sliding_window  # one config object
    return model


def row_caps(pairs) -> dict:
    """max_tokens_per_row that packs 4 pairs into 4 rows, 2 rows (of unequal length), 1 row."""
    n = [len(p) for p in pairs]
    return {"pair-per-row": None, "padded-rows": max(n[0] + n[1], n[2] + n[3]), "one-row": sum(n)}


def own_masks(model, token_type_ids: torch.Tensor) -> dict:
    """transformers' masks for one unpadded sequence ([1, 1, T, T] bool per layer type)."""
    T = token_type_ids.shape[-1]
    text = model.config.get_text_config()
    return create_masks_for_vision_model(
        config=text, inputs_embeds=torch.zeros(1, T, text.hidden_size), attention_mask=torch.ones(1, T, dtype=torch.long),
        past_key_values=None, position_ids=None, block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids))


def packed_masks(model, batch) -> dict:
    return gemma3_family.GEMMA3.attention_inputs(model, batch, "sdpa")["attention_mask"]


# --- the tiny model, its processor and its family entry


def test_tiny_model_and_processor(g3):
    tok = g3.processor.tokenizer
    assert type(g3.processor).__name__ == "Gemma3Processor"
    assert type(g3.processor.image_processor).__name__.startswith("Gemma3ImageProcessor")
    assert g3.encoder.prompt_text(QUESTION) == (
        f"<bos><start_of_turn>user\n<start_of_image>{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    pair = g3.pairs[0]
    image = "<image_soft_token>" * MM_TOKENS_PER_IMAGE
    assert tok.decode(pair.prompt_ids) == (f"<bos><start_of_turn>user\n\n\n<start_of_image>{image}<end_of_image>\n\n"
                                           f"What shape are the objects in the image?<end_of_turn>\n"
                                           f"<start_of_turn>model\n")
    for marker in ("<bos>", "<start_of_turn>", "<start_of_image>", "<end_of_image>"):  # control tokens, one id each
        assert tok.convert_tokens_to_ids(marker) in pair.prompt_ids
    assert pair.prompt_ids.count(tok.bos_token_id) == 1
    # token_type_ids mark exactly the image soft tokens, as the model's block rule needs
    types = pair.prompt_token_inputs["token_type_ids"][0]
    assert torch.equal(types == 1, torch.tensor(pair.prompt_ids) == g3.image_id)
    assert int(types.sum()) == MM_TOKENS_PER_IMAGE
    assert pair.image_inputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert tok.decode(pair.chosen_ids) == "They are triangles.<end_of_turn>"
    assert pair.chosen_ids.count(tok.eos_token_id) == 1 and pair.chosen_ids[-1] == tok.eos_token_id
    ids = g3.encoder.answer_ids(QUESTION, "I see <image_soft_token> and <end_of_turn> here")  # text stays text
    assert g3.image_id not in ids and ids.count(tok.eos_token_id) == 1
    for width, height in ((64, 64), (200, 90)):  # any size is resized to one IMAGE_SIZE square: the same tokens
        row = {"idx": 0, "image": Image.new("RGB", (width, height), (200, 30, 30)), "question": QUESTION,
               "chosen": "red", "rejected": "blue"}
        assert g3.encoder.prompt_length(QUESTION, (height, width)) == len(g3.encoder.encode(row).prompt_ids)


def test_loads_through_the_model_config(g3):
    """`bundled:gemma3` through the loaders that train and evaluate use; under 3 MB of float32 weights."""
    cfg = ModelConfig(name_or_path="bundled:gemma3", dtype="float32")
    assert type(load_processor(cfg)).__name__ == "Gemma3Processor"
    model = load_base_model(cfg, torch.device("cpu"))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 3e6
    text = model.config.get_text_config()
    assert text.layer_types == LAYER_TYPES and text.sliding_window == SLIDING_WINDOW
    assert {"sliding_attention", "full_attention"} <= set(LAYER_TYPES)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied, as released


def test_tiny_build_is_deterministic(tmp_path):
    a, b = build_gemma3(tmp_path / "a", seed=0), build_gemma3(tmp_path / "b", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").stat().st_size < 3_000_000


def test_family_entry_and_module_paths(g3):
    model = tiny(g3)
    family = family_for(model.config)
    assert family is gemma3_family.GEMMA3 and family.packed and family.backends == ("sdpa",)
    modules = dict(model.named_modules())
    assert modules[family.language_model] is model.model.language_model
    assert modules[family.vision_tower] is model.model.vision_tower
    assert modules[family.projector] is model.model.multi_modal_projector


def test_only_sdpa_is_exact(g3):
    """auto picks sdpa on every device; pairs (two causal SDPA calls) and flex know neither rule: one line each."""
    for device in ("cpu", "cuda"):
        assert resolve_backend("auto", torch.device(device), gemma3_family.GEMMA3.backends) == "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(g3.path, dtype=torch.float32)
    assert set_attention_backend(model, "auto") == "sdpa"
    for backend in ("pairs", "flex"):
        with pytest.raises(ValueError, match=f"attention backend '{backend}' does not support") as err:
            set_attention_backend(model, backend)
        assert "\n" not in str(err.value)
    batch = PackedCollator(g3.pad_id, g3.image_id)(g3.pairs[:1])
    with pytest.raises(ValueError, match="needs the sdpa backend"):
        gemma3_family.GEMMA3.attention_inputs(model, batch, "pairs")


# --- the packed masks


@pytest.mark.parametrize("window", WINDOWS)
def test_packed_masks_are_the_models_own(g3, window):
    """In one row of three pairs, each pair's [prompt, chosen] and [prompt, rejected] sub-masks are exactly the masks
    transformers builds for that sequence alone, per layer type; nothing crosses pairs, rejected never sees chosen."""
    model = tiny(g3, window)
    pairs = g3.pairs[:3]
    batch = PackedCollator(g3.pad_id, g3.image_id, max_tokens_per_row=10_000)(pairs)
    masks = packed_masks(model, batch)
    assert set(masks) == {"full_attention", "sliding_attention"}
    for i, pair in enumerate(pairs):
        where = (batch["pair_index"][0] == i).nonzero().squeeze(1)
        P, C = len(pair.prompt_ids), len(pair.chosen_ids)
        types = batch["token_type_ids"][0, where]
        chosen_seq, rejected_seq = where[: P + C], torch.cat([where[:P], where[P + C:]])
        for seq in (chosen_seq, rejected_seq):
            own = own_masks(model, types[None, torch.isin(where, seq)])
            for layer_type, mask in masks.items():
                assert torch.equal(mask[0, 0][seq][:, seq], own[layer_type][0, 0]), (i, layer_type)
        others = batch["pair_index"][0] != i
        for mask in masks.values():
            assert not mask[0, 0][where][:, others].any()
            assert not mask[0, 0][where[P + C:]][:, where[P: P + C]].any()


def test_image_block_is_bidirectional_in_the_packed_mask(g3):
    """Each image token sees the later tokens of its own block in both layer types, the earlier ones in full
    attention, and in sliding attention the earlier ones inside the window (transformers' AND(window, OR(causal,
    block))); no image token of another pair; text sees the image only causally."""
    model = tiny(g3, 8)
    batch = PackedCollator(g3.pad_id, g3.image_id, max_tokens_per_row=10_000)(g3.pairs[:2])
    image = batch["token_type_ids"][0] == 1
    masks = packed_masks(model, batch)
    for i in range(2):
        block = image & (batch["pair_index"][0] == i)
        first = block.nonzero()[0, 0]
        assert int(block.sum()) == MM_TOKENS_PER_IMAGE > 8  # the block is wider than the window
        q, k = torch.arange(MM_TOKENS_PER_IMAGE)[:, None], torch.arange(MM_TOKENS_PER_IMAGE)[None, :]
        for mask in masks.values():
            assert mask[0, 0][block][:, block][k >= q].all()  # later image tokens too, also beyond the window
        assert masks["full_attention"][0, 0][block][:, block].all()
        assert torch.equal(masks["sliding_attention"][0, 0][block][:, block], k > q - 8)
        for mask in masks.values():
            m = mask[0, 0]
            assert not m[block][:, image & ~block].any()
            assert not m[first - 1, block].any()  # the token before the image sees none of it


# --- packed == plain


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["", "grad-ckpt"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", WINDOWS)
def test_packed_equals_plain(g3, window, layout, gradient_checkpointing):
    pairs = g3.pairs[:4] if not gradient_checkpointing else g3.pairs[4:8]
    assert len({len(p) for p in pairs}) > 1, "the test needs pairs of different lengths"
    assert min(len(p.prompt_ids) for p in pairs) > window  # every rejected answer's window ends inside the prompt
    batch = assert_equivalent(tiny(g3, window), pairs, g3.pad_id, g3.image_id, row_caps(pairs)[layout],
                              gradient_checkpointing)
    rows = batch["input_ids"].shape[0]
    assert rows == LAYOUTS[layout]
    assert batch["input_ids"].shape[1] > 2 * window
    if rows == 2:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


@pytest.mark.parametrize("window", WINDOWS)
def test_three_rejected_per_prompt_equal_the_plain_forward(g3, window):
    """[P, C, R1, R2, R3] groups in one row: every answer's window is measured from its own restarted positions,
    and the image block stays bidirectional inside each prompt."""
    groups = with_rejected(g3.pairs[:3], 3)
    batch = assert_equivalent(tiny(g3, window), groups, g3.pad_id, g3.image_id, sum(map(len, groups)))
    assert batch["input_ids"].shape[0] == 1 and len(batch["meta"]) == 9


def logps_with_masks(g3, monkeypatch, window, masks):
    """Plain, packed and packed-with-`masks`-as-`gemma3_masks` log-probs of 4 pairs in one row."""
    model = tiny(g3, window).eval()
    pairs = g3.pairs[:4]
    batch = PackedCollator(g3.pad_id, g3.image_id, max_tokens_per_row=10_000)(pairs)
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs, g3.pad_id)
        right = packed_logps(model, batch)
        monkeypatch.setattr(gemma3_family, "gemma3_masks", masks)
        wrong = packed_logps(model, batch)
    return plain, right, wrong


@pytest.mark.parametrize("window", WINDOWS)
def test_the_window_is_measured_in_restarted_positions(g3, monkeypatch, window):
    """Measured in row indices, rejected's window would cover chosen's (masked) slots instead of the prompt's end."""
    real = gemma3_family.gemma3_masks

    def in_row_indices(pair_index, span, position_ids, *rest):
        return real(pair_index, span, torch.arange(span.shape[1]).expand_as(span), *rest)

    plain, right, wrong = logps_with_masks(g3, monkeypatch, window, in_row_indices)
    assert rel_err(right.rejected, plain.rejected) <= 1e-5
    assert rel_err(wrong.rejected, plain.rejected) > 1e-3
    assert rel_err(wrong.chosen, plain.chosen) <= 1e-5  # chosen's positions are its row indices (pair 0's, and so on)


@pytest.mark.parametrize("window", WINDOWS)
def test_without_image_blocks_packed_differs_from_plain(g3, monkeypatch, window):
    real = gemma3_family.gemma3_masks

    def causal_images(pair_index, span, position_ids, token_type_ids, *rest):
        return real(pair_index, span, position_ids, None, *rest)

    plain, right, wrong = logps_with_masks(g3, monkeypatch, window, causal_images)
    assert rel_err(right.chosen, plain.chosen) <= 1e-5
    assert rel_err(wrong.chosen, plain.chosen) > 1e-3 and rel_err(wrong.rejected, plain.rejected) > 1e-3
