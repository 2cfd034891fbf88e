"""Gemma 3: image tokens attend to each other both ways, and most layers see only a sliding window.

transformers 5.17's `Gemma3Model.forward` builds, from `token_type_ids` (1 = image soft token), one mask per
layer type (`create_masks_for_vision_model`):
- full_attention:    OR(causal, same image block)
- sliding_attention: AND(kv > q - sliding_window, OR(causal, same image block))
where q and kv are indices into the sequence, which in an unpacked sequence are its positions. A dict of masks
keyed by layer type, given as `attention_mask`, is used as it is (by `Gemma3Model` and `Gemma3TextModel`), and
SDPA ignores the layer's `sliding_window` argument, so the dense masks below carry both rules:
- the image block (a run of `token_type_ids == 1` inside one pair's prompt) is bidirectional, as in the pair's
  own sequence;
- the window is measured in the restarted positions (`position_ids`), not in row indices, so a rejected token at
  position p sees a prompt token at position q iff p - q < sliding_window, exactly as in its own sequence.

Only the dense SDPA mask is exact here: the pairs backend's two causal SDPA calls know neither rule, and a
FlexAttention BlockMask would need the same two rules (not written yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_orpo.modeling.families import ModelFamily


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[rows, T]: the number of the image block each token is in (contiguous runs of type 1), -1 elsewhere; as
    transformers' `get_block_sequence_ids_for_mask`, numbered along the whole row."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def gemma3_masks(pair_index: torch.Tensor, span: torch.Tensor, position_ids: torch.Tensor,
                 token_type_ids: torch.Tensor | None, sliding_window: int | None,
                 layer_types: set[str]) -> dict[str, torch.Tensor]:
    """Dense bool masks [rows, 1, T, T] (True = may attend) keyed by layer type, for a packed batch."""
    from vlm_orpo.modeling.shared_prefix import dense_mask

    full = dense_mask(pair_index, span)  # same group, causal, each answer sees only the prompt and itself
    if token_type_ids is not None:
        blocks = image_blocks(token_type_ids)
        same_pair = pair_index[:, :, None] == pair_index[:, None, :]
        same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0) & same_pair
        full = full | same_block[:, None]
    masks = {}
    for layer_type in layer_types:
        if layer_type == "full_attention":
            masks[layer_type] = full
        elif layer_type == "sliding_attention":
            if sliding_window is None:
                masks[layer_type] = full
            else:
                distance = position_ids[:, :, None] - position_ids[:, None, :]  # query position - key position
                masks[layer_type] = full & (distance < sliding_window)[:, None]
        else:
            raise ValueError(f"Gemma 3 layer type {layer_type!r} has no packed mask")
    return masks


@dataclass(frozen=True)
class Gemma3Family(ModelFamily):
    def attention_inputs(self, model, batch: dict, backend: str) -> dict | None:
        if backend != "sdpa":
            raise ValueError(f"Gemma 3's packed forward needs the sdpa backend (dense masks), not {backend!r}")
        text = model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (all text attends both ways) cannot pack "
                             "chosen and rejected in one row")
        masks = gemma3_masks(
            batch["pair_index"], batch["span"], batch["position_ids"], batch.get("token_type_ids"),
            text.sliding_window, set(text.layer_types),
        )
        return {"attention_mask": masks}


GEMMA3 = Gemma3Family(
    name="gemma3",
    model_types=("gemma3",),
    language_model="model.language_model",
    projector="model.multi_modal_projector",
    vision_tower="model.vision_tower",
    backends=("sdpa",),
)
