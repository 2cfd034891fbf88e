"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): 3D M-RoPE positions for the packed row.

These models rotate each token by three positions (temporal, height, width). When no `position_ids` are given,
transformers 5.17's `Qwen2VLModel.forward` (and 2.5's, 3's) builds them with `get_rope_index` from the
processor's `mm_token_type_ids` (0 text, 1 image, 2 video) and the grids: text runs 1, 2, 3... on all three
axes; an image or video's tokens get (t, h, w) positions on its merged grid, starting at the current position;
the text after it continues from the current position + the grid's larger spatial side (Qwen2.5-VL spaces video
frames by `tokens_per_second * second_per_grid_ts`, Qwen3-VL takes each frame as its own grid). The result is
`[3, batch, T]`, which the text model reads as rope positions only (a leading fourth row of 1D text positions
would also feed transformers' mask creation; none is passed, so nothing reads our restarted positions as
separate sequences).

The packed forward passes `[3, rows, T]` built the same way: each prompt gets the rope index of the prompt
alone (the model's own `get_rope_index`, one call for the batch, grids in pair order as the collators lay
them), and every answer token continues from where the prompt ends, chosen and rejected alike, on all axes:
answer token j (1D collator position P + j) gets `s + j`, where `s` is the position the model gives the first
text token after the prompt (found by asking `get_rope_index` about the prompt plus one text token). That is
exactly what `get_rope_index` gives `[prompt, answer]` in the plain forward, including after a video whose
temporal positions run past its spatial ones. The model's own forward then merges the image features
(Qwen3-VL: also its deepstack features, at the image tokens of the packed rows, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_orpo.data.packing import Part
from vlm_orpo.modeling.families import ModelFamily

# keys of the processor's outputs that `get_rope_index` reads besides the token types
_GRID_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def _prompt_batch(batch: dict, n_groups: int, type_ids: torch.Tensor):
    """Each group's prompt, right-padded, plus one text token: ids, token types, attention mask [groups, P + 1];
    and where each prompt token of the packed rows sits in it (group, offset), and each prompt's length."""
    prompt = batch["span"] == Part.PROMPT
    pair = batch["pair_index"][prompt]  # row-major: each pair's prompt tokens in order
    lengths = torch.bincount(pair, minlength=n_groups)
    starts = lengths.cumsum(0) - lengths
    offset = torch.arange(pair.numel(), device=pair.device) - starts[pair]
    width = int(lengths.max()) + 1
    ids = batch["input_ids"].new_zeros(n_groups, width)
    types = type_ids.new_zeros(n_groups, width)
    ids[pair, offset] = batch["input_ids"][prompt]
    types[pair, offset] = type_ids[prompt]
    mask = torch.arange(width, device=ids.device)[None, :] <= lengths[:, None]  # the prompt and one text token
    return ids, types, mask.long(), pair, offset, lengths


def token_types(model, batch: dict) -> torch.Tensor:
    """The processor's `mm_token_type_ids` as laid out by the collator, or the same derived from the ids."""
    if "mm_token_type_ids" in batch:
        return batch["mm_token_type_ids"]
    config = model.config
    ids = batch["input_ids"]
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == config.image_token_id] = 1
    types[ids == config.video_token_id] = 2
    return types


def mrope_position_ids(model, batch: dict) -> torch.Tensor:
    """[3, rows, T] M-RoPE positions of a packed batch (see the module docstring); padding keeps its 1D positions."""
    n_groups = len(batch["pairs_per_group"])  # prompts: a prompt with k rejected answers is one group
    ids, types, mask, pair, offset, lengths = _prompt_batch(batch, n_groups, token_types(model, batch))
    grids = {key: batch["images"][key] for key in _GRID_KEYS if key in batch["images"]}
    rope, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **grids)
    answer_start = rope[0, torch.arange(n_groups, device=ids.device), lengths]  # the text token after each prompt

    flat = batch["position_ids"]
    positions = flat[None].repeat(3, 1, 1)
    prompt = batch["span"] == Part.PROMPT
    positions[:, prompt] = rope[:, pair, offset].to(positions.dtype)
    answer = batch["span"] >= Part.CHOSEN  # chosen and every rejected answer of the group
    owner = batch["pair_index"][answer]
    positions[:, answer] = (flat[answer] - lengths[owner] + answer_start[owner]).to(positions.dtype)
    return positions


@dataclass(frozen=True)
class QwenVLFamily(ModelFamily):
    # transformers 5.17's Qwen-VL text models refuse flex_attention, so `auto` on CUDA must not pick it
    backends: tuple[str, ...] = ("pairs", "sdpa")

    def position_ids(self, model, batch: dict) -> torch.Tensor:
        return mrope_position_ids(model, batch)


_PATHS = dict(language_model="model.language_model", projector="model.visual.merger", vision_tower="model.visual")

QWEN2_VL = QwenVLFamily(name="qwen2_vl", model_types=("qwen2_vl",), **_PATHS)

QWEN2_5_VL = QwenVLFamily(name="qwen2_5_vl", model_types=("qwen2_5_vl",), **_PATHS)

# Qwen3-VL's deepstack mergers (model.visual.deepstack_merger_list) also project vision features into the text
# model; `projector` names the main merger only (what lora.train_projector trains)
QWEN3_VL = QwenVLFamily(name="qwen3_vl", model_types=("qwen3_vl",), **_PATHS)

# Qwen3-VL with a mixture-of-experts decoder: each token is routed on its own hidden state, so a packed row routes
# every token as its own sequence would (transformers' experts never drop tokens over a capacity); the router and the
# experts are parameters, not Linear layers, so LoRA's all-linear adapts attention only
QWEN3_VL_MOE = QwenVLFamily(name="qwen3_vl_moe", model_types=("qwen3_vl_moe",), **_PATHS)
