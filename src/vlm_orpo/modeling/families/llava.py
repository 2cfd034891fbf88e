"""LLaVA-like families: vision features merged by the model's own forward into a 1D-rope text model.

- LLaVA-1.5 and LLaVA-NeXT (1.6, Mistral and Vicuna variants): CLIP + Llama/Mistral/Vicuna.
- LLaVA-OneVision: SigLIP + Qwen2, AnyRes crops with `anyres_max_9` downsampling, `image_newline`.
- InternVL (3, 3.5 `-hf` checkpoints): InternViT + Qwen2/Qwen3/Llama, pixel-shuffled tiles.
- Mistral 3 (Mistral Small 3.x): Pixtral (its own 2D rope and block-diagonal image mask) + Mistral.

All keep transformers' usual layout: `model.language_model`, `model.multi_modal_projector`, `model.vision_tower`.
Each model's forward hands `attention_mask`, `position_ids` and its `**kwargs` (so the pairs backend's
`pair_layout`) straight to the language model, and calls its vision tower without them, so the vision tower
keeps its own attention and masks. Positions are the collator's 1D restart; no family hook is needed.
"""

from vlm_orpo.modeling.families import ModelFamily

LLAVA = ModelFamily(
    name="llava",
    model_types=("llava", "llava_next"),
    language_model="model.language_model",
    projector="model.multi_modal_projector",
    vision_tower="model.vision_tower",
)

_PATHS = dict(language_model=LLAVA.language_model, projector=LLAVA.projector, vision_tower=LLAVA.vision_tower)

LLAVA_ONEVISION = ModelFamily(name="llava_onevision", model_types=("llava_onevision",), **_PATHS)

INTERNVL = ModelFamily(name="internvl", model_types=("internvl",), **_PATHS)

MISTRAL3 = ModelFamily(name="mistral3", model_types=("mistral3",), **_PATHS)
