"""The pairs attention backend: its layout allows exactly the dense mask's query/key pairs, its output and
gradients equal SDPA under that mask, no [T, T] mask reaches it, and without a layout it is plain SDPA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from equivalence import lora_model, rel_err
from test_shared_prefix import llava15, llava15_pairs
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlm_orpo.data.packing import PackedCollator
from vlm_orpo.modeling import attention
from vlm_orpo.modeling.backends import packs_pairs, row_cap
from vlm_orpo.data.packing import PlainCollator
from vlm_orpo.modeling.shared_prefix import (
    attention_backend,
    dense_mask,
    packed_logps,
    resolve_backend,
    set_attention_backend,
)


def padded_batch():
    """Rows of unequal length: two pairs share a row, and rows end in padding."""
    batch = PackedCollator(0, 127, max_tokens_per_row=90)(llava15_pairs())
    assert batch["input_ids"].shape[0] > 1 and (batch["pair_index"] == -1).any()
    assert any(len(set(row.tolist()) - {-1}) > 1 for row in batch["pair_index"])
    return batch


def allowed_by_layout(layout, tokens):
    """[tokens, tokens] bool: which query token meets which key token in the two SDPA calls, real queries only."""
    allowed = torch.zeros(tokens, tokens, dtype=torch.bool)
    n, longest_pc = layout.prompt_chosen.shape
    slots = torch.arange(n * longest_pc).view(n, longest_pc)
    causal = torch.ones(longest_pc, longest_pc, dtype=torch.bool).tril()
    rejected_slots = n * longest_pc + torch.arange(layout.rejected_queries.numel()).view_as(layout.rejected_queries)
    calls = [
        (layout.prompt_chosen, layout.prompt_chosen, slots, causal.expand(n, -1, -1)),
        (layout.rejected_queries, layout.rejected_keys, rejected_slots, layout.rejected_mask[:, 0]),
    ]
    for queries, keys, slot, mask in calls:
        read_back = layout.source[queries] == slot  # the slot's output is what its token gets
        for i, a, b in mask.nonzero().tolist():
            if read_back[i, a]:
                allowed[queries[i, a], keys[i, b]] = True
    return allowed


def test_layout_allows_exactly_the_dense_mask():
    batch = padded_batch()
    pair_index, span = batch["pair_index"], batch["span"]
    rows, T = pair_index.shape
    layout = attention.pair_layout(pair_index, span)
    allowed = allowed_by_layout(layout, rows * T)
    expected = torch.block_diag(*dense_mask(pair_index, span)[:, 0])
    real = (pair_index >= 0).flatten()
    assert torch.equal(allowed[real], expected[real])
    assert not allowed[~real].any()  # padding queries are not computed at all
    assert layout.source[real].unique().numel() == int(real.sum())  # every real token reads its own slot


def test_pairs_attention_output_and_gradients_equal_dense_sdpa():
    """Random queries/keys with grouped KV heads: same output on real tokens, zeros on padding, same gradients."""
    batch = padded_batch()
    pair_index, span = batch["pair_index"], batch["span"]
    rows, T = pair_index.shape
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, h, T, 8, generator=gen, requires_grad=True) for h in (4, 2, 2)]
    real = pair_index >= 0
    upstream = torch.randn(rows, T, 4, 8, generator=gen) * real[:, :, None, None]

    def run(attend):
        out, _ = attend()
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        return out, grads

    dense, dense_grads = run(lambda: sdpa_attention_forward(module, *inputs, dense_mask(pair_index, span)))
    layout = attention.pair_layout(pair_index, span)
    pairs, pairs_grads = run(lambda: attention.pairs_attention(module, *inputs, None, pair_layout=layout))
    assert rel_err(pairs[real], dense[real]) <= 1e-6
    assert not pairs[~real].any()
    for got, want in zip(pairs_grads, dense_grads):
        assert rel_err(got, want) <= 1e-6


def test_no_token_by_token_mask_reaches_the_pairs_attention(monkeypatch):
    """The win: transformers builds no [T, T] mask for a packed forward; the layout alone keeps pairs apart."""
    model = lora_model(llava15("pairs"))
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("pair_layout")))
        return attention.pairs_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.IMPLEMENTATION, spy)
    with torch.no_grad():
        packed_logps(model, padded_batch())
    assert len(seen) == model.config.text_config.num_hidden_layers
    assert all(mask is None and isinstance(layout, attention.PairLayout) for mask, layout in seen)


def test_without_a_layout_pairs_is_sdpa():
    """Generation and plain padded forwards (no layout) get SDPA with transformers' own masks."""
    pairs = llava15_pairs(3)
    plain = PlainCollator(0, -1)(pairs)
    batch = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"], **plain["images"]}
    assert (batch["attention_mask"] == 0).any(), "the plain batch must be padded"
    prompt = {"input_ids": torch.tensor([pairs[0].prompt_ids]), **pairs[0].image_inputs}
    outputs = {}
    for backend in ("sdpa", "pairs"):
        model = llava15(backend)
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        outputs[backend] = (logits, generated)
    assert rel_err(outputs["pairs"][0], outputs["sdpa"][0]) <= 1e-6
    assert torch.equal(outputs["pairs"][1], outputs["sdpa"][1])


@pytest.mark.parametrize("backend", ["sdpa", "flex", "pairs"])
def test_the_model_holds_the_backend_for_the_text_model_only(backend):
    model = lora_model(llava15())
    assert set_attention_backend(model, backend) == backend
    assert attention_backend(model) == backend
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_auto_and_the_packing_policy():
    assert resolve_backend("auto", torch.device("cpu")) == "pairs"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert not packs_pairs("sdpa")  # the dense mask pays for every other pair in the row
    assert packs_pairs("pairs") and packs_pairs("flex")
    with pytest.raises(ValueError, match="resolved backend"):
        packs_pairs("auto")
    # the collator's cap: the configured one where packing cannot lose, a pair per row with the dense mask
    assert row_cap(4096, "sdpa") is None and row_cap(4096, "pairs") == 4096 and row_cap(None, "flex") is None
