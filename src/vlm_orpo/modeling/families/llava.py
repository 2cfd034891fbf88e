"""LLaVA-1.5 and LLaVA-NeXT (1.6, Mistral and Vicuna variants): 1D positions, image features merged by the model."""

from vlm_orpo.modeling.families import ModelFamily

LLAVA = ModelFamily(
    name="llava",
    model_types=("llava", "llava_next"),
    language_model="model.language_model",
    projector="model.multi_modal_projector",
    vision_tower="model.vision_tower",
)
