"""Let transformers 5.17 load image processors of the new families when torchvision is not installed.

Our CPU environment has no torchvision (PyPI's wheel does not import beside the pinned CPU torch), and
transformers 5.17 refuses several processors without it, although their image paths need only Pillow:
- Qwen2/2.5/3-VL, LLaVA-OneVision and InternVL processors require a video processor, checked against
  `transformers.BaseVideoProcessor`, which without torchvision is a placeholder nothing is an instance of. The
  real class needs no torchvision; it is put back where transformers looks. (Images only: a checkpoint that
  names the family's own video processor still needs torchvision.)
- Idefics2/Idefics3/SmolVLM PIL image processors are classed as torchvision-backed because their docstrings
  say "Mirrors TorchvisionBackend"; the real PIL classes are put on their lazy modules.
- `PixtralProcessor` (Mistral 3) and `Gemma4Processor` import `image_processing_pixtral` / `image_processing_gemma4`,
  which import torchvision, for pure-Python helpers that the PIL modules have verbatim; a stand-in module with
  those helpers lets them import.

`load_processor` calls `allow_processors_without_torchvision` before `AutoProcessor`; with torchvision
installed it does nothing, and transformers picks its own (faster) backends.
"""

from __future__ import annotations

import importlib
import sys
import types

_PIL_IMAGE_PROCESSORS = {  # model package -> its PIL image processor class
    "idefics2": "Idefics2ImageProcessorPil",
    "idefics3": "Idefics3ImageProcessorPil",
    "smolvlm": "SmolVLMImageProcessorPil",
}


def _transformers_modules() -> list[types.ModuleType]:
    """The transformers package as its own module and as `processing_utils` holds it (two objects)."""
    from transformers import processing_utils

    modules = (sys.modules["transformers"], processing_utils.transformers_module)
    return list({id(m): m for m in modules}.values())


def _publish(lazy: types.ModuleType, name: str, real) -> None:
    """Put a real class on a lazy module in place of its missing-backend placeholder."""
    setattr(lazy, name, real)
    missing = getattr(lazy, "_object_missing_backend", None)
    if isinstance(missing, dict):
        missing.pop(name, None)


def _allow_base_video_processor() -> None:
    from transformers.video_processing_utils import BaseVideoProcessor

    for module in _transformers_modules():
        module.BaseVideoProcessor = BaseVideoProcessor


def _allow_pil_image_processors() -> None:
    for package, name in _PIL_IMAGE_PROCESSORS.items():
        lazy = importlib.import_module(f"transformers.models.{package}")
        real = getattr(importlib.import_module(f"transformers.models.{package}.image_processing_pil_{package}"), name)
        _publish(lazy, name, real)


# model package -> (its processor class, the helpers its processing module imports from the torchvision-backed
# image processor module, which the PIL module has verbatim)
_STAND_INS = {
    "pixtral": ("PixtralProcessor", ("get_resize_output_image_size",)),
    "gemma4": ("Gemma4Processor", ("Gemma4ImageProcessorKwargs", "get_aspect_ratio_preserving_size")),
}


def _allow_processors_with_stand_ins() -> None:
    for package, (processor, helpers) in _STAND_INS.items():
        name = f"transformers.models.{package}.image_processing_{package}"
        if name not in sys.modules:
            pil = importlib.import_module(f"transformers.models.{package}.image_processing_pil_{package}")
            stand_in = types.ModuleType(name, "stand-in without torchvision (vlm_orpo): the PIL module's helpers")
            for helper in helpers:
                setattr(stand_in, helper, getattr(pil, helper))
            sys.modules[name] = stand_in
        real = getattr(importlib.import_module(f"transformers.models.{package}.processing_{package}"), processor)
        for module in [sys.modules[f"transformers.models.{package}"], *_transformers_modules()]:
            _publish(module, processor, real)


_done = False


def allow_processors_without_torchvision() -> None:
    """Apply the three workarounds above once; a no-op when torchvision is installed."""
    global _done
    from transformers.utils import is_torchvision_available

    if _done or is_torchvision_available():
        return
    _allow_base_video_processor()
    _allow_pil_image_processors()
    _allow_processors_with_stand_ins()
    _done = True
