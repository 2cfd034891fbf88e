"""Model geometry and inputs: the random-weight model of a family's size (`families`) with LoRA, and seeded pairs
whose images go through the family's real preprocessing, so token counts match a real run."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import replace

import numpy as np
import torch

from vlm_orpo.data.packing import EncodedPair
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.shared_prefix import unwrap

from .families import FAMILIES, Size

LORA_R = 16  # alpha = 2r


def build_config(size: Size):
    """The family's transformers config from the size's keywords (text and vision configs by their model_type)."""
    from transformers import AutoConfig

    config = {**size.config, FAMILIES[size.family].image_token_key: size.image_token_id}
    return AutoConfig.for_model(size.family, text_config=dict(size.text), vision_config=dict(size.vision), **config)


def build_image_processor(size: Size):
    """The family's own image preprocessing (PIL backend), with the size's settings."""
    module, name = FAMILIES[size.family].image_processor.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)(**size.processor)


def build_model(size: Size, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-weight model instantiated directly on `device` in `dtype` (a 7B never exists on the host).

    Weights that transformers starts at zero (Gemma 3's projector) get random values too, so that every image
    moves the loss and the loss check would see an image merged in the wrong place."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(build_config(size), dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.device.type != "meta" and not p.any():
                p.normal_(std=0.02)
    return model


def count_image_tokens(model, image_inputs: dict) -> int:
    """Image tokens of one image by the model's own rule: how many feature vectors its vision path gives."""
    hf = unwrap(model)
    inputs = {k: v.to(hf.device, hf.dtype) if v.is_floating_point() else v.to(hf.device)
              for k, v in image_inputs.items()}
    with torch.no_grad():
        features = hf.get_image_features(**inputs).pooler_output
    return sum(f.numel() // f.shape[-1] for f in (features if isinstance(features, (list, tuple)) else [features]))


def answer_length(size: Size, rng: np.random.Generator) -> int:
    lo, hi = size.answer_range
    return int(np.clip(np.rint(rng.lognormal(mean=math.log(size.answer_median), sigma=size.answer_sigma)), lo, hi))


def make_pairs(model, size: Size, n: int, seed: int, rejected_per_prompt: int = 1) -> list[EncodedPair]:
    """`n` pairs, each with its own random-pixel image of `size.image_hw` and random token ids.

    Prompt: BOS, a few [INST] tokens, the image tokens, the rest of the question; answers (lognormal lengths,
    chosen and rejected drawn independently) end in EOS. The image tokens are one run: a family's markers around
    or between them (Qwen's vision start/end, Idefics3's row/column tokens, Pixtral's row breaks) are text tokens
    that the model does not treat specially, left out. Pair i depends only on (seed, i); its rejected answers
    2..k are drawn after everything else, so `with_rejected` of these pairs at a smaller k gives the same pairs.
    """
    from PIL import Image

    processor = build_image_processor(size)
    vocab, image_id, reserved = size.text["vocab_size"], size.image_token_id, size.reserved_ids
    token_inputs = FAMILIES[size.family].token_inputs
    # what the model's forward takes by name: the family's processor drops the rest (Gemma 3's num_crops)
    forward_keys = inspect.signature(unwrap(model).forward).parameters
    height, width = size.image_hw
    n_image = None
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])

        def tokens(k):  # ordinary text ids: not BOS/EOS/PAD, not the image token nor another special one
            ids = rng.integers(3, vocab - len(reserved), size=k)
            for special in reserved:  # ascending: each shift moves the ids past one reserved id
                ids = np.where(ids >= special, ids + 1, ids)
            return ids.tolist()

        chosen_len, rejected_len = answer_length(size, rng), answer_length(size, rng)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        outputs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        image_inputs = {k: v for k, v in outputs.items() if k in forward_keys}
        if n_image is None:  # all images have one size, so one count
            n_image = count_image_tokens(model, image_inputs)
        head = 4
        prompt = [1, *tokens(head - 1), *([image_id] * n_image), *tokens(size.question_tokens - head)]
        pairs.append(
            EncodedPair(
                idx=i,
                prompt_ids=prompt,
                chosen_ids=[*tokens(chosen_len - 1), 2],
                rejected_ids=[*tokens(rejected_len - 1), 2],
                image_inputs=image_inputs,
                prompt_token_inputs={key: (torch.tensor([prompt]) == image_id).long() for key in token_inputs},
                more_rejected_ids=[[*tokens(answer_length(size, rng) - 1), 2] for _ in range(rejected_per_prompt - 1)],
            )
        )
    return pairs


def with_rejected(pairs: list[EncodedPair], k: int) -> list[EncodedPair]:
    """The pairs with their first k rejected answers (made with at least k by `make_pairs`)."""
    if any(p.rejected_count < k for p in pairs):
        raise ValueError(f"the pairs were made with fewer than {k} rejected answers")
    return [replace(p, more_rejected_ids=p.more_rejected_ids[: k - 1]) for p in pairs]


def attach_lora(model, r: int = LORA_R, adapter_dtype: str = "fp32"):
    """PEFT LoRA on every linear layer of the language model, A and B random (gradients are real)."""
    from peft import LoraConfig, get_peft_model

    family = family_for(model.config)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=lora_target_regex(model, family, "all-linear"),
        init_lora_weights=False,
        bias="none",
    )
    # PEFT's default keeps adapters in fp32 under a bf16 base (what training gets); "model" keeps the base dtype.
    return get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "fp32")


def crops_per_image(size: Size, image_inputs: dict) -> int | None:
    """Vision-tower crops of one LLaVA-NeXT image (anyres grid + base image): what its vision FLOPs scale with;
    None for the other families, whose vision FLOPs the formula does not count."""
    if not FAMILIES[size.family].clip_vision:
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(
        image_inputs["image_sizes"][0].tolist(), size.config["image_grid_pinpoints"], size.vision["image_size"]
    )
