"""The packed shared-prefix forward must equal the plain two-sequence forward: log-probs, ORPO loss, LoRA grads,
on every attention backend with a CPU backward (dense SDPA mask and the pairs attention)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from equivalence import assert_equivalent, rel_err
from vlm_orpo.data.packing import EncodedPair, PackedCollator, Part
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.shared_prefix import dense_mask, packed_logps, set_attention_backend

BACKENDS = ["sdpa", "pairs"]  # flex has no CPU backward: its forward is checked against sdpa below


def llava_next(asset_cache, backend="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"], dtype=torch.float32)
    set_attention_backend(model, backend)
    return model


def llava15(backend="sdpa"):
    """A tiny LLaVA-1.5 (CLIP + Llama, one 32x32 image = 16 image tokens), random weights."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        ),
        image_token_id=127,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    set_attention_backend(model, backend)
    return model


def llava15_pairs(n=5):
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for i in range(n):
        q = torch.randint(3, 120, (3 + i,), generator=gen).tolist()
        prompt = [1, 5, *([127] * 16), *q, 7]
        chosen = torch.randint(3, 120, (2 + (i * 3) % 7,), generator=gen).tolist() + [2]
        rejected = torch.randint(3, 120, (1 + (i * 5) % 6,), generator=gen).tolist() + [2]
        pixels = torch.randn(1, 3, 32, 32, generator=gen)
        pairs.append(EncodedPair(i, prompt, chosen, rejected, {"pixel_values": pixels}))
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_tokens_per_row", [None, 700, 4000], ids=["pair-per-row", "padded-rows", "one-row"])
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_llava_next_packed_equals_plain(asset_cache, tiny_pairs, max_tokens_per_row, gradient_checkpointing, backend):
    encoder, pairs = tiny_pairs
    pairs = pairs[:4]
    assert len({len(p) for p in pairs}) > 1, "the test needs pairs of different lengths"
    batch = assert_equivalent(
        llava_next(asset_cache, backend), pairs, encoder.tokenizer.pad_token_id, encoder.image_token_id,
        max_tokens_per_row, gradient_checkpointing,
    )
    rows = batch["input_ids"].shape[0]
    assert rows == {None: 4, 700: 2, 4000: 1}[max_tokens_per_row]
    if rows > 1:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_llava15_packed_equals_plain(gradient_checkpointing, backend):
    assert_equivalent(llava15(backend), llava15_pairs(), 0, 127, 90, gradient_checkpointing)


def test_mask_hides_chosen_from_rejected_and_pairs_from_each_other():
    pairs = llava15_pairs(2)
    batch = PackedCollator(0, 127, max_tokens_per_row=1000)(pairs)
    assert batch["input_ids"].shape[0] == 1
    mask = dense_mask(batch["pair_index"], batch["span"])[0, 0]
    span, pair = batch["span"][0], batch["pair_index"][0]
    rej = (span == Part.REJECTED) & (pair == 0)
    cho = (span == Part.CHOSEN) & (pair == 0)
    assert not mask[rej][:, cho].any()
    assert mask[rej][:, (span == 0) & (pair == 0)].all()  # rejected sees the whole prompt
    assert not mask[pair == 1][:, pair == 0].any()
    # rejected positions restart right after the prompt
    P = len(pairs[0].prompt_ids)
    assert batch["position_ids"][0][rej].tolist() == list(range(P, P + len(pairs[0].rejected_ids)))


def test_seed_style_cache_reuse_differs_from_the_right_answer():
    """Guard against the seed's trick: letting rejected see chosen changes rejected's log-probs."""
    model = llava15()
    pairs = llava15_pairs(2)
    batch = PackedCollator(0, 127)(pairs)
    with torch.no_grad():
        right = packed_logps(model, batch)
        leaky = dict(batch, span=torch.where(batch["span"] == Part.REJECTED, Part.CHOSEN, batch["span"]))
        wrong = packed_logps(model, leaky)
    assert torch.allclose(right.chosen, wrong.chosen)
    assert not torch.allclose(right.rejected, wrong.rejected, atol=1e-4)


def test_lm_head_only_on_answer_positions(tiny_pairs):
    encoder, pairs = tiny_pairs
    batch = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id)(pairs[:2])
    answer_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs[:2])
    assert batch["target_ids"].numel() == answer_tokens
    assert batch["logits_to_keep"].numel() < answer_tokens < batch["input_ids"].shape[1]


def test_flex_block_mask_matches_dense_on_cpu_forward(asset_cache, tiny_pairs):
    """FlexAttention has no CPU backward in torch 2.13, but its forward must agree with SDPA."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    encoder, pairs = tiny_pairs
    model = llava_next(asset_cache)
    batch = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id, 4000)(pairs[:3])
    with torch.no_grad():
        dense = packed_logps(model, batch)
        set_attention_backend(model, "flex")  # the model holds the backend; packed_logps builds the matching mask
        try:
            flex = packed_logps(model, batch)
        except Exception as exc:  # pragma: no cover - depends on the CPU inductor toolchain
            pytest.skip(f"flex attention forward unavailable on this CPU: {type(exc).__name__}")
    assert rel_err(flex.chosen, dense.chosen) <= 1e-5
    assert rel_err(flex.rejected, dense.rejected) <= 1e-5


def test_lora_targets_given_as_one_name_or_a_list(asset_cache):
    from vlm_orpo.config import ConfigError

    base = llava_next(asset_cache)
    family = family_for(base.config)
    assert lora_target_regex(base, family, "q_proj") == lora_target_regex(base, family, ["q_proj"])
    assert lora_target_regex(base, family, "q_proj").endswith(r"\.(q_proj)$")
    with pytest.raises(ConfigError, match=r"\['qproj'\] not found"):
        lora_target_regex(base, family, "qproj")
