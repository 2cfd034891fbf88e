"""What differs between VLM families, kept out of the shared-prefix core.

A family names where its language model, projector and vision tower live (for LoRA targets, freezing,
quantization and export) and may override two things of the packed forward: how position ids are built
(Qwen2-VL's 3D M-RoPE) and the attention inputs (Gemma 3's and Gemma 4's bidirectional image blocks and sliding
windows). Image-feature merging is left to the model's own forward.

A model type with no entry here still trains: `generic_family` finds its modules on a meta-device copy, and it
runs on the plain two-sequence forward (`modeling.forward`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

# transformers' layer types that are softmax attention; anything else (linear attention, state space) carries
# state along the row, which would leak chosen into rejected in a packed row
SOFTMAX_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    language_model: str  # module path of the text decoder
    projector: str
    vision_tower: str
    packed: bool = True  # the shared-prefix forward is proven equal to the plain one for this family
    backends: tuple[str, ...] = ("pairs", "sdpa", "flex")  # attention backends it supports; auto picks the first
    # that the device can run

    def position_ids(self, model, batch: dict) -> torch.Tensor:
        """1D rope positions, restarting for the rejected answer, as the collator built them."""
        return batch["position_ids"]

    def attention_inputs(self, model, batch: dict, backend: str) -> dict | None:
        """Model-forward keywords for the mask, if this family needs more than the shared-prefix rule (None)."""
        return None


# model_type -> "module:ATTRIBUTE" under vlm_orpo.modeling.families, imported on first use
_ENTRIES = {
    "llava": "llava:LLAVA",
    "llava_next": "llava:LLAVA",
    "llava_onevision": "llava:LLAVA_ONEVISION",
    "internvl": "llava:INTERNVL",
    "mistral3": "llava:MISTRAL3",
    "qwen2_vl": "qwen2_vl:QWEN2_VL",
    "qwen2_5_vl": "qwen2_vl:QWEN2_5_VL",
    "qwen3_vl": "qwen2_vl:QWEN3_VL",
    "qwen3_vl_moe": "qwen2_vl:QWEN3_VL_MOE",
    "gemma3": "gemma3:GEMMA3",
    "gemma4": "gemma3:GEMMA4",
    "idefics3": "idefics3:IDEFICS3",
    "smolvlm": "idefics3:SMOLVLM",
}


def family_for(config) -> ModelFamily:
    """The family of a transformers config; a model type with no entry gets `generic_family`."""
    model_type = getattr(config, "model_type", None)
    entry = _ENTRIES.get(model_type)
    if entry is None:
        return generic_family(config)
    module, attribute = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def supported_model_types() -> list[str]:
    """Model types on the shared-prefix path."""
    return sorted(_ENTRIES)


def recurrent_layers(config) -> list[str]:
    """The text decoder's layer types that are not softmax attention (empty for a pure attention decoder)."""
    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    return sorted(set(layer_types) - SOFTMAX_LAYER_TYPES)


def shared_prefix_refusal(config) -> str | None:
    """Why this model cannot take the packed forward, or None when it can."""
    family = family_for(config)
    recurrent = recurrent_layers(config)
    if recurrent:
        return (f"{family.name} has {', '.join(recurrent)} layers, whose recurrent state would carry chosen into "
                f"rejected in a packed row")
    if not family.packed:
        return f"family {family.name} has no shared-prefix support yet"
    return None


_VISION_TOWERS = ("model.vision_tower", "model.visual", "model.vision_model", "model.vision_encoder")
_PROJECTORS = ("model.multi_modal_projector", "model.connector", "model.visual.merger", "model.mlp1",
               "model.embed_vision", "model.multi_modal_projector.linear_2")


_GENERIC: dict[str, ModelFamily] = {}  # by the config's JSON: built once per model, not per call


def generic_family(config) -> ModelFamily:
    """A model type with no entry: its module paths, found on a meta-device copy of the model (no weights)."""
    from transformers import AutoModelForImageTextToText

    model_type = getattr(config, "model_type", None)
    key = config.to_json_string()
    if key in _GENERIC:
        return _GENERIC[key]
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"model type {model_type!r} is not an image-text-to-text model that transformers knows "
                         f"({type(exc).__name__}: {exc})") from None
    names = {id(module): name for name, module in model.named_modules()}
    present = set(names.values())
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    language_model = names.get(id(decoder)) or next((n for n in ("model.language_model",) if n in present), None)
    if not language_model:
        raise ValueError(f"cannot find the language model of model type {model_type!r}")
    _GENERIC[key] = ModelFamily(
        name=model_type,
        model_types=(model_type,),
        language_model=language_model,
        projector=next((p for p in _PROJECTORS if p in present), "model.multi_modal_projector"),
        vision_tower=next((v for v in _VISION_TOWERS if v in present), "model.vision_tower"),
        packed=False,
    )
    return _GENERIC[key]
