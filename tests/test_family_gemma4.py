"""Gemma 4 on the shared-prefix path, as a tiny model built offline (`bundled:gemma4`): with
use_bidirectional_attention "vision", image tokens attend to each other both ways inside their block
(`mm_token_type_ids`), in the sliding-attention layers only (the full-attention layers stay causal), and the
sliding layer sees only a window; per-layer inputs and a KV-shared last layer come along unchanged.

The packed masks are the model's own for each pair's [prompt, chosen] and [prompt, rejected]; packed == plain
(log-probs, loss, every LoRA gradient) with a pair per row, padded rows and one row, with and without gradient
checkpointing, at the builder's window (24, cutting into the image block), and at a window of 8 (only the
question's end) in one row. Dropping either rule (the window in row indices instead of restarted positions, or no
image blocks) makes packed differ from plain, so the equivalence tests see both. That the full layers stay causal
over the image is checked on the masks only: in this tiny model no answer can tell (giving the full layers image
blocks changes no log-prob, as the last layer reuses the second's keys and values). Only sdpa is exact: auto picks it, pairs and flex are
one-line errors, and so is use_bidirectional_attention "all"."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from equivalence import assert_equivalent, rel_err, with_rejected
from vlm_orpo.assets import ensure_tiny_model
from vlm_orpo.assets.tiny_gemma4 import (LAYER_TYPES, MM_TOKENS_PER_IMAGE, NUM_KV_SHARED_LAYERS, PER_LAYER_INPUT,
                                         SLIDING_WINDOW, build_gemma4)
from vlm_orpo.config import ModelConfig
from vlm_orpo.data.packing import PackedCollator, PairEncoder
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.families import gemma3 as gemma_family
from vlm_orpo.modeling.load import load_base_model, load_processor
from vlm_orpo.modeling.plain import plain_pair_logps
from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision
from vlm_orpo.modeling.shared_prefix import packed_logps, resolve_backend, set_attention_backend

LAYOUTS = {"pair-per-row": 4, "padded-rows": 2, "one-row": 1}  # rows for 4 pairs
QUESTION = "What colour is the shape?"
GEMMA4 = gemma_family.GEMMA4


@pytest.fixture(scope="module")
def g4(asset_cache):
    """The tiny model dir, processor, encoder and 8 encoded pairs of the bundled data (lengths 92..107)."""
    path = ensure_tiny_model("gemma4")
    allow_processors_without_torchvision()  # Gemma4Processor's module imports torchvision for two helpers
    processor = AutoProcessor.from_pretrained(path)
    encoder = PairEncoder(processor, max_answer_tokens=32)
    rows = pq.read_table(asset_cache["train"]).slice(0, 8).to_pylist()
    return SimpleNamespace(path=path, processor=processor, encoder=encoder, pairs=[encoder.encode(r) for r in rows],
                           pad_id=encoder.tokenizer.pad_token_id, image_id=encoder.image_token_id)


def tiny(g4, sliding_window: int = SLIDING_WINDOW, bidirectional: str | None = "vision"):
    """The tiny model on sdpa, its text config's window and bidirectional mode set (read when masks are built)."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(g4.path, dtype=torch.float32)
    set_attention_backend(model, "sdpa")
    text = model.config.get_text_config()
    text.sliding_window, text.use_bidirectional_attention = sliding_window, bidirectional
    assert model.model.language_model.config.sliding_window == sliding_window  # one config object
    return model


def row_caps(pairs) -> dict:
    """max_tokens_per_row that packs 4 pairs into 4 rows, 2 rows (of unequal length), 1 row."""
    n = [len(p) for p in pairs]
    return {"pair-per-row": None, "padded-rows": max(n[0] + n[1], n[2] + n[3]), "one-row": sum(n)}


def own_masks(model, mm_token_type_ids: torch.Tensor) -> dict:
    """transformers' masks for one unpadded sequence ([1, 1, T, T] bool per layer type); a mask that SDPA may
    replace by its own causal flag (None) is the causal one."""
    T = mm_token_type_ids.shape[-1]
    text = model.config.get_text_config()
    masks = create_masks_for_vision_model(
        config=text, inputs_embeds=torch.zeros(1, T, text.hidden_size), attention_mask=torch.ones(1, T, dtype=torch.long),
        past_key_values=None, position_ids=None,
        block_sequence_ids=get_block_sequence_ids_for_mask(mm_token_type_ids, torch.device("cpu")))
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    return {k: causal if m is None else m for k, m in masks.items()}


def packed_masks(model, batch) -> dict:
    return GEMMA4.attention_inputs(model, batch, "sdpa")["attention_mask"]


# --- the tiny model, its processor and its family entry


def test_tiny_model_and_processor(g4):
    tok = g4.processor.tokenizer
    assert type(g4.processor).__name__ == "Gemma4Processor"
    assert type(g4.processor.image_processor).__name__.startswith("Gemma4ImageProcessor")
    assert g4.encoder.prompt_text(QUESTION) == f"<bos><|turn>user\n<|image|>{QUESTION}<turn|>\n<|turn>model\n"
    pair = g4.pairs[0]
    n_image = (torch.tensor(pair.prompt_ids) == g4.image_id).sum().item()
    image = "<|image|>" * n_image
    assert tok.decode(pair.prompt_ids) == (f"<bos><|turn>user\n<|image>{image}<image|>"
                                           f"What shape are the objects in the image?<turn|>\n<|turn>model\n")
    for marker in ("<bos>", "<|turn>", "<|image>", "<image|>"):  # control tokens, one id each
        assert tok.convert_tokens_to_ids(marker) in pair.prompt_ids
    assert pair.prompt_ids.count(tok.bos_token_id) == 1
    # mm_token_type_ids mark exactly the image soft tokens, as the model's block rule needs
    types = pair.prompt_token_inputs["mm_token_type_ids"][0]
    assert torch.equal(types == 1, torch.tensor(pair.prompt_ids) == g4.image_id) and set(types.tolist()) == {0, 1}
    assert set(pair.image_inputs) == {"pixel_values", "image_position_ids"}
    assert tok.decode(pair.chosen_ids) == "They are triangles.<turn|>"
    assert pair.chosen_ids.count(tok.eos_token_id) == 1 and pair.chosen_ids[-1] == tok.eos_token_id
    ids = g4.encoder.answer_ids(QUESTION, "I see <|image|> and <turn|> here")  # text stays text
    assert g4.image_id not in ids and ids.count(tok.eos_token_id) == 1
    # a 128x128 image is 64 tokens; other sizes keep their aspect ratio within the same patch budget
    for (width, height), n in (((128, 128), MM_TOKENS_PER_IMAGE), ((64, 64), MM_TOKENS_PER_IMAGE), ((200, 90), 60)):
        row = {"idx": 0, "image": Image.new("RGB", (width, height), (200, 30, 30)), "question": QUESTION,
               "chosen": "red", "rejected": "blue"}
        encoded = g4.encoder.encode(row)
        assert encoded.prompt_ids.count(g4.image_id) == n
        assert g4.encoder.prompt_length(QUESTION, (height, width)) == len(encoded.prompt_ids)


def test_loads_through_the_model_config(g4):
    """`bundled:gemma4` through the loaders that train and evaluate use; under 3 MB of float32 weights."""
    cfg = ModelConfig(name_or_path="bundled:gemma4", dtype="float32")
    assert type(load_processor(cfg)).__name__ == "Gemma4Processor"
    model = load_base_model(cfg, torch.device("cpu"))
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 3e6
    text = model.config.get_text_config()
    assert text.layer_types == LAYER_TYPES and text.sliding_window == SLIDING_WINDOW
    assert {"sliding_attention", "full_attention"} <= set(LAYER_TYPES)
    assert text.use_bidirectional_attention == "vision" and model.config.audio_config is None
    assert text.hidden_size_per_layer_input == PER_LAYER_INPUT and text.num_kv_shared_layers == NUM_KV_SHARED_LAYERS
    layers = model.model.language_model.layers
    assert [layer.self_attn.is_kv_shared_layer for layer in layers] == [False, False, True]
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied, as released


def test_tiny_build_is_deterministic(tmp_path):
    a, b = build_gemma4(tmp_path / "a", seed=0), build_gemma4(tmp_path / "b", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").stat().st_size < 3_000_000


def test_family_entry_and_module_paths(g4):
    model = tiny(g4)
    family = family_for(model.config)
    assert family is GEMMA4 and family.packed and family.backends == ("sdpa",)
    modules = dict(model.named_modules())
    assert modules[family.language_model] is model.model.language_model
    assert modules[family.vision_tower] is model.model.vision_tower
    assert modules[family.projector] is model.model.embed_vision


def test_only_sdpa_is_exact(g4):
    """auto picks sdpa on every device; pairs (two causal SDPA calls) and flex know neither rule: one line each;
    use_bidirectional_attention "all" (every token both ways) cannot pack: one line."""
    for device in ("cpu", "cuda"):
        assert resolve_backend("auto", torch.device(device), GEMMA4.backends) == "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(g4.path, dtype=torch.float32)
    assert set_attention_backend(model, "auto") == "sdpa"
    for backend in ("pairs", "flex"):
        with pytest.raises(ValueError, match=f"attention backend '{backend}' does not support") as err:
            set_attention_backend(model, backend)
        assert "\n" not in str(err.value)
    batch = PackedCollator(g4.pad_id, g4.image_id)(g4.pairs[:1])
    with pytest.raises(ValueError, match="Gemma 4's packed forward needs the sdpa backend"):
        GEMMA4.attention_inputs(model, batch, "pairs")
    model.config.get_text_config().use_bidirectional_attention = "all"
    with pytest.raises(ValueError, match="cannot pack chosen and rejected in one row") as err:
        GEMMA4.attention_inputs(model, batch, "sdpa")
    assert "\n" not in str(err.value)


# --- the packed masks


@pytest.mark.parametrize("bidirectional", ["vision", None])
@pytest.mark.parametrize("window", [SLIDING_WINDOW, 8])
def test_packed_masks_are_the_models_own(g4, window, bidirectional):
    """In one row of three pairs, each pair's [prompt, chosen] and [prompt, rejected] sub-masks are exactly the masks
    transformers builds for that sequence alone, per layer type (with image blocks or, use_bidirectional_attention
    None, without); nothing crosses pairs, rejected never sees chosen."""
    model = tiny(g4, window, bidirectional)
    pairs = g4.pairs[:3]
    batch = PackedCollator(g4.pad_id, g4.image_id, max_tokens_per_row=10_000)(pairs)
    masks = packed_masks(model, batch)
    assert set(masks) == {"full_attention", "sliding_attention"}
    for i, pair in enumerate(pairs):
        where = (batch["pair_index"][0] == i).nonzero().squeeze(1)
        P, C = len(pair.prompt_ids), len(pair.chosen_ids)
        types = batch["mm_token_type_ids"][0, where]
        chosen_seq, rejected_seq = where[: P + C], torch.cat([where[:P], where[P + C:]])
        for seq in (chosen_seq, rejected_seq):
            own = own_masks(model, types[None, torch.isin(where, seq)]) if bidirectional else None
            if own is None:  # transformers' masks without image blocks: causal and sliding causal
                T = len(seq)
                q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
                own = {"full_attention": (k <= q)[None, None],
                       "sliding_attention": ((k <= q) & (k > q - window))[None, None]}
            for layer_type, mask in masks.items():
                assert torch.equal(mask[0, 0][seq][:, seq], own[layer_type][0, 0]), (i, layer_type)
        others = batch["pair_index"][0] != i
        for mask in masks.values():
            assert not mask[0, 0][where][:, others].any()
            assert not mask[0, 0][where[P + C:]][:, where[P: P + C]].any()


def test_image_block_is_bidirectional_in_sliding_layers_only(g4):
    """Each image token sees the later tokens of its own block in the sliding layer, also beyond the window, and the
    earlier ones inside the window (transformers' AND(window, OR(causal, block))); the full layer is causal over the
    image, unlike Gemma 3's; no
    image token of another pair; the token before the image sees none of it."""
    model = tiny(g4, 8)
    batch = PackedCollator(g4.pad_id, g4.image_id, max_tokens_per_row=10_000)(g4.pairs[:2])
    image = batch["mm_token_type_ids"][0] == 1
    masks = packed_masks(model, batch)
    for i in range(2):
        block = image & (batch["pair_index"][0] == i)
        first = block.nonzero()[0, 0]
        n = int(block.sum())
        assert n > 8  # the block is wider than the window
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        assert torch.equal(masks["sliding_attention"][0, 0][block][:, block], k > q - 8)  # later ones beyond it too
        assert torch.equal(masks["full_attention"][0, 0][block][:, block], k <= q)
        for mask in masks.values():
            m = mask[0, 0]
            assert not m[block][:, image & ~block].any()
            assert not m[first - 1, block].any()


# --- packed == plain


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["", "grad-ckpt"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_plain(g4, layout, gradient_checkpointing):
    pairs = g4.pairs[:4] if not gradient_checkpointing else g4.pairs[4:8]
    assert len({len(p) for p in pairs}) > 1, "the test needs pairs of different lengths"
    assert min(len(p.prompt_ids) for p in pairs) > SLIDING_WINDOW  # every rejected answer's window ends in the prompt
    batch = assert_equivalent(tiny(g4), pairs, g4.pad_id, g4.image_id, row_caps(pairs)[layout],
                              gradient_checkpointing)
    rows = batch["input_ids"].shape[0]
    assert rows == LAYOUTS[layout]
    assert batch["input_ids"].shape[1] > 2 * SLIDING_WINDOW
    if rows == 2:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


def test_packed_equals_plain_with_a_short_window_and_three_rejected(g4):
    """Window 8 (only the question's end): [P, C, R1, R2, R3] groups in one row, every answer's window measured from
    its own restarted positions, the image block bidirectional inside each prompt."""
    groups = with_rejected(g4.pairs[:3], 3)
    batch = assert_equivalent(tiny(g4, 8), groups, g4.pad_id, g4.image_id, sum(map(len, groups)))
    assert batch["input_ids"].shape[0] == 1 and len(batch["meta"]) == 9


def logps_with_masks(g4, monkeypatch, window, masks=None, bidirectional="vision"):
    """Plain, packed and packed-with-`masks`-as-`gemma3_masks` log-probs of 4 pairs in one row."""
    model = tiny(g4, window, bidirectional).eval()
    pairs = g4.pairs[:4]
    batch = PackedCollator(g4.pad_id, g4.image_id, max_tokens_per_row=10_000)(pairs)
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs, g4.pad_id)
        right = packed_logps(model, batch)
        if masks is None:
            return plain, right, None
        monkeypatch.setattr(gemma_family, "gemma3_masks", masks)
        wrong = packed_logps(model, batch)
    return plain, right, wrong


def test_the_window_is_measured_in_restarted_positions(g4, monkeypatch):
    """Measured in row indices, rejected's window would cover chosen's (masked) slots instead of the prompt's end."""
    real = gemma_family.gemma3_masks

    def in_row_indices(pair_index, span, position_ids, *rest):
        return real(pair_index, span, torch.arange(span.shape[1]).expand_as(span), *rest)

    plain, right, wrong = logps_with_masks(g4, monkeypatch, SLIDING_WINDOW, in_row_indices)
    assert rel_err(right.rejected, plain.rejected) <= 1e-5
    assert rel_err(wrong.rejected, plain.rejected) > 1e-3
    assert rel_err(wrong.chosen, plain.chosen) <= 1e-5  # chosen's positions are its row indices (pair 0's, and so on)


def test_without_image_blocks_packed_differs_from_plain(g4, monkeypatch):
    real = gemma_family.gemma3_masks

    def causal_images(pair_index, span, position_ids, is_image, *rest):
        return real(pair_index, span, position_ids, None, *rest)

    plain, right, wrong = logps_with_masks(g4, monkeypatch, SLIDING_WINDOW, causal_images)
    assert rel_err(right.chosen, plain.chosen) <= 1e-5
    assert rel_err(wrong.chosen, plain.chosen) > 1e-3 and rel_err(wrong.rejected, plain.rejected) > 1e-3


def test_without_vision_mode_images_are_causal(g4, monkeypatch):
    """use_bidirectional_attention None (the smaller released models): transformers builds causal and sliding causal
    masks, and so does the family: packed == plain without image blocks."""
    plain, right, _ = logps_with_masks(g4, monkeypatch, SLIDING_WINDOW, bidirectional=None)
    assert rel_err(right.chosen, plain.chosen) <= 1e-5 and rel_err(right.rejected, plain.rejected) <= 1e-5
