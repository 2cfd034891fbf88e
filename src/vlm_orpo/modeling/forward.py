"""Which forward a model trains with: the packed shared-prefix one, or the plain two-sequence fallback.

`model.forward_mode` chooses (auto | packed | plain); the collator then builds that layout and the batch says
which it is (`batch["layout"]`), so `pair_logps` needs no other state.
"""

from __future__ import annotations

import logging

from vlm_orpo.data.packing import PackedCollator, PlainCollator
from vlm_orpo.errors import ConfigError
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling.backends import row_cap
from vlm_orpo.modeling.families import shared_prefix_refusal
from vlm_orpo.modeling.plain import plain_logps
from vlm_orpo.modeling.shared_prefix import attention_backend, packed_logps, unwrap

log = logging.getLogger(__name__)

def resolve_forward_mode(requested: str, config) -> str:
    """"packed" or "plain" for `config.FORWARD_MODES`' choice; `packed` where the model cannot take it is a
    one-line error, and `auto` says once why a model trains on the plain forward."""
    if requested == "plain":
        return "plain"
    refusal = shared_prefix_refusal(config)
    if refusal is None:
        return "packed"
    if requested == "packed":
        raise ConfigError(f"model.forward_mode=packed: {refusal}; use forward_mode auto or plain")
    log.warning("%s: plain two-sequence forward", refusal)
    return "plain"


def pair_collator(mode: str, model, pad_token_id: int, image_token_id: int, max_tokens_per_row: int | None,
                  sft_on_prompt: bool):
    """The collator of a resolved forward mode; packing several pairs a row only where the backend gains."""
    if mode == "plain":
        return PlainCollator(pad_token_id, image_token_id, sft_on_prompt)
    cap = row_cap(max_tokens_per_row, attention_backend(unwrap(model)))
    return PackedCollator(pad_token_id, image_token_id, cap, sft_on_prompt)


def pair_logps(model, batch: dict) -> PairLogps:
    """Per-pair summed answer log-probs of a collated batch, by the forward its layout needs."""
    return (packed_logps if batch["layout"] == "packed" else plain_logps)(model, batch)
