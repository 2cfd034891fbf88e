"""Idefics3 and SmolVLM: a SigLIP-style vision tower over image crops plus a global image, a pixel-shuffle
connector, and a Llama-style text model with 1D positions.

Nothing of the packed forward differs from LLaVA's: the model's own forward drops the all-zero (padding) crops
that the collators add when pairs have different crop counts, encodes the rest, and scatters the features over
the `<image>` tokens in row-major order (Idefics3 with `masked_scatter`, SmolVLM block by block with per-row
offsets), which is the order in which the collators lay out the pairs' images. `pixel_attention_mask` goes to
the forward with the pixels. The text model takes the mask, restarted positions and `pair_layout` as LLaVA's.
"""

from __future__ import annotations

from vlm_orpo.modeling.families import ModelFamily

IDEFICS3 = ModelFamily(
    name="idefics3",
    model_types=("idefics3",),
    language_model="model.text_model",
    projector="model.connector",
    vision_tower="model.vision_model",
)

SMOLVLM = ModelFamily(
    name="smolvlm",
    model_types=("smolvlm",),
    language_model="model.text_model",
    projector="model.connector",
    vision_tower="model.vision_model",
)
