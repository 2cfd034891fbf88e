"""What differs between VLM families, kept out of the shared-prefix core.

A family names where its language model, projector and vision tower live (for LoRA targets, freezing and
export) and may override how position ids are built (Qwen2-VL's 3D rope will). Image-feature merging is left
to the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    language_model: str  # module path prefix of the text decoder
    projector: str
    vision_tower: str

    def position_ids(self, model, batch: dict) -> torch.Tensor:
        """1D rope positions, restarting for the rejected answer, as the collator built them."""
        return batch["position_ids"]


def _registry() -> dict[str, ModelFamily]:
    from vlm_orpo.modeling.families.llava import LLAVA

    return {model_type: family for family in (LLAVA,) for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_registry())


def family_for(config) -> ModelFamily:
    model_type = getattr(config, "model_type", None)
    family = _registry().get(model_type)
    if family is None:
        raise ValueError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return family
