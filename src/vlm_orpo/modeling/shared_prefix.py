"""The packed forward: image and prompt once per prefix group, its chosen and rejected answers side by side.

The model's own forward does the image-feature merge; we hand it what its attention backend needs to keep
pairs apart and chosen from rejected (a dense bool mask for SDPA, a FlexAttention BlockMask, or the pairs
backend's layout), the restarted position ids, and `logits_to_keep` so the LM head runs only on positions that
predict answer tokens.
"""

from __future__ import annotations

import torch

from vlm_orpo.data.packing import TOKEN_INPUTS
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling import attention
from vlm_orpo.modeling.backends import ATTN_BACKENDS
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.logps import answer_logps


def unwrap(model):
    """The transformers model under DDP/compile/PEFT wrappers (LoRA layers are injected in place)."""
    while hasattr(model, "module"):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_IMPLEMENTATIONS = {"sdpa": "sdpa", "flex": "flex_attention", "pairs": attention.IMPLEMENTATION}  # transformers' names


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...] = ("pairs", "sdpa", "flex")) -> str:
    """`auto` is the fastest exact backend measured on the device that the family supports: FlexAttention on
    CUDA, pairs elsewhere, then the family's own order (`supported`, e.g. Gemma 3's dense sdpa masks only)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        fastest = ("flex", "pairs", "sdpa") if device.type == "cuda" else ("pairs", "sdpa")
        return next(b for b in (*fastest, *supported) if b in supported)
    if backend not in supported:
        raise ValueError(f"attention backend {backend!r} does not support this model family; it supports "
                         f"{', '.join(supported)}")
    return backend


def set_attention_backend(model, backend: str) -> str:
    """Point the language model's attention at SDPA, FlexAttention or pairs; the vision tower keeps its own.

    The model is the one holder of this choice: `attention_backend` reads it back."""
    hf = unwrap(model)
    resolved = resolve_backend(backend, hf.device, family_for(hf.config).backends)
    hf.set_attn_implementation({"text_config": _IMPLEMENTATIONS[resolved]})
    return resolved


def attention_backend(model) -> str:
    """"sdpa", "flex" or "pairs": what the language model's attention is set to, so its inputs are built to match."""
    implementation = unwrap(model).config.get_text_config()._attn_implementation
    return next((name for name, impl in _IMPLEMENTATIONS.items() if impl == implementation), "sdpa")


def sees_answer(query_answer: torch.Tensor, key_answer: torch.Tensor) -> torch.Tensor:
    """Whether a query of answer number `query_answer` may see a key of `key_answer` (`span` values): the key is
    the prompt (0) or in the query's own answer, so rejected never sees chosen nor another rejected answer.

    Written arithmetically: Inductor once miscompiled the same rule written with | and & in a flex mask_mod."""
    return key_answer * (key_answer - query_answer) == 0


def dense_mask(pair_index: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] bool, True = may attend: causal within a prefix group, and each answer sees only the prompt
    and itself.

    Padding has pair_index -1, so pads attend only to pads and no query row is empty (no NaN in SDPA).
    """
    T = pair_index.shape[1]
    pos = torch.arange(T, device=pair_index.device)
    causal = pos[:, None] >= pos[None, :]
    same_group = pair_index[:, :, None] == pair_index[:, None, :]
    return (same_group & causal & sees_answer(span[:, :, None], span[:, None, :]))[:, None]


def block_mask(pair_index: torch.Tensor, span: torch.Tensor):
    """The same rule as `dense_mask`, as a FlexAttention BlockMask (fully masked blocks are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        same_group = pair_index[b, q] == pair_index[b, kv]
        return same_group & (kv <= q) & sees_answer(span[b, q], span[b, kv])

    rows, T = pair_index.shape
    return create_block_mask(mask_mod, rows, None, T, T, device=pair_index.device)


def attention_inputs(backend: str, pair_index: torch.Tensor, span: torch.Tensor) -> dict:
    """The model-forward keywords that make `backend` apply the shared-prefix rule.

    For pairs, an all-ones 2D mask tells transformers there is no padding, so it builds no mask at all (SDPA's
    is_causal skip), and the layout does all the masking."""
    if backend == "pairs":
        return {"attention_mask": torch.ones_like(pair_index), "pair_layout": attention.pair_layout(pair_index, span)}
    build = block_mask if backend == "flex" else dense_mask
    return {"attention_mask": build(pair_index, span)}


def packed_logps(model, batch: dict) -> PairLogps:
    """Per-pair summed answer log-probs from one forward over packed rows (see `data.packing`)."""
    hf = unwrap(model)
    family = family_for(hf.config)
    backend = attention_backend(hf)
    mask = family.attention_inputs(hf, batch, backend) or attention_inputs(backend, batch["pair_index"], batch["span"])
    outputs = model(
        input_ids=batch["input_ids"],
        **mask,
        position_ids=family.position_ids(hf, batch),
        logits_to_keep=batch["logits_to_keep"],
        use_cache=False,
        **{key: batch[key] for key in TOKEN_INPUTS if key in batch},
        **batch["images"],
    )
    return answer_logps(outputs.logits, batch)
