"""Gemma 3 and Gemma 4: image tokens attend to each other both ways, and most layers see only a sliding window.

transformers 5.17 builds, from per-token types, one mask per layer type (`create_masks_for_vision_model`):
- Gemma 3 (`Gemma3Model.forward`, `token_type_ids`, 1 = image soft token):
    full_attention:    OR(causal, same image block)
    sliding_attention: AND(kv > q - sliding_window, OR(causal, same image block))
- Gemma 4 (`Gemma4Model.forward`, `mm_token_type_ids`, 1 = image and 2 = video soft token), only when the text
  config's `use_bidirectional_attention` is "vision" (else causal and sliding causal masks, no image block):
    full_attention:    causal
    sliding_attention: AND(kv > q - sliding_window, OR(causal, same image block))
where q and kv are indices into the sequence, which in an unpacked sequence are its positions. A dict of masks
keyed by layer type, given as `attention_mask`, is used as it is (by both models and their text models), and
SDPA ignores the layer's `sliding_window` argument, so the dense masks below carry both rules:
- the image block (a run of image tokens inside one pair's prompt) is bidirectional in the layer types the model
  makes it so, as in the pair's own sequence;
- the window is measured in the restarted positions (`position_ids`), not in row indices, so a rejected token at
  position p sees a prompt token at position q iff p - q < sliding_window, exactly as in its own sequence.
Everything else of Gemma 4's decoder is per token or follows the mask (per-layer inputs are looked up from each
token's id; a KV-shared layer reuses an earlier layer's keys and values at the same positions), so it packs as is.

Only the dense SDPA mask is exact here: the pairs backend's two causal SDPA calls know neither rule, and a
FlexAttention BlockMask would need the same two rules (not written yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_orpo.modeling.families import ModelFamily

BOTH_LAYER_TYPES = ("full_attention", "sliding_attention")


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """[rows, T]: the number of the image block each token is in (contiguous runs of image tokens), -1 elsewhere;
    as transformers' `get_block_sequence_ids_for_mask`, numbered along the whole row."""
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def gemma3_masks(pair_index: torch.Tensor, span: torch.Tensor, position_ids: torch.Tensor,
                 is_image: torch.Tensor | None, sliding_window: int | None, layer_types: set[str],
                 block_layer_types: tuple[str, ...] = BOTH_LAYER_TYPES) -> dict[str, torch.Tensor]:
    """Dense bool masks [rows, 1, T, T] (True = may attend) keyed by layer type, for a packed batch; the image
    blocks of `is_image` ([rows, T] bool, None for none) are bidirectional in the layers of `block_layer_types`."""
    from vlm_orpo.modeling.shared_prefix import dense_mask

    causal = dense_mask(pair_index, span)  # same group, causal, each answer sees only the prompt and itself
    with_blocks = causal
    if is_image is not None and block_layer_types:
        blocks = image_blocks(is_image)
        same_pair = pair_index[:, :, None] == pair_index[:, None, :]
        same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0) & same_pair
        with_blocks = causal | same_block[:, None]
    masks = {}
    for layer_type in layer_types:
        if layer_type not in BOTH_LAYER_TYPES:
            raise ValueError(f"Gemma layer type {layer_type!r} has no packed mask")
        mask = with_blocks if layer_type in block_layer_types else causal
        if layer_type == "sliding_attention" and sliding_window is not None:
            distance = position_ids[:, :, None] - position_ids[:, None, :]  # query position - key position
            mask = mask & (distance < sliding_window)[:, None]
        masks[layer_type] = mask
    return masks


@dataclass(frozen=True)
class Gemma3Family(ModelFamily):
    title: str = "Gemma 3"
    token_types: str = "token_type_ids"  # the processor's per-token types the model's block rule reads
    image_types: tuple[int, ...] = (1,)  # the types that are image (or video) soft tokens
    block_layer_types: tuple[str, ...] = BOTH_LAYER_TYPES  # the layer types whose image blocks are bidirectional
    block_modes: tuple = (False, None)  # the text config's use_bidirectional_attention values with image blocks

    def attention_inputs(self, model, batch: dict, backend: str) -> dict | None:
        if backend != "sdpa":
            raise ValueError(f"{self.title}'s packed forward needs the sdpa backend (dense masks), not {backend!r}")
        text = model.config.get_text_config()
        mode = getattr(text, "use_bidirectional_attention", None)
        if mode is True or mode == "all":
            raise ValueError(f"{self.title} with use_bidirectional_attention={mode!r} (all text attends both ways) "
                             f"cannot pack chosen and rejected in one row")
        types = batch.get(self.token_types)
        is_image = torch.isin(types, torch.tensor(self.image_types, device=types.device)) if types is not None else None
        masks = gemma3_masks(
            batch["pair_index"], batch["span"], batch["position_ids"], is_image, text.sliding_window,
            set(text.layer_types), self.block_layer_types if mode in self.block_modes else (),
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

GEMMA4 = Gemma3Family(
    name="gemma4",
    model_types=("gemma4",),
    language_model="model.language_model",
    projector="model.embed_vision",
    vision_tower="model.vision_tower",
    backends=("sdpa",),
    title="Gemma 4",
    token_types="mm_token_type_ids",
    image_types=(1, 2),
    block_layer_types=("sliding_attention",),
    block_modes=("vision",),
)
