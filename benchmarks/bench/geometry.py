"""Model geometry and inputs: the benchmark sizes, their random-weight LLaVA-NeXT models with LoRA, and seeded
pairs whose images go through the real LLaVA-NeXT preprocessing, so token counts match a real run."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from vlm_orpo.data.packing import EncodedPair
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.shared_prefix import unwrap

LORA_R = 16  # alpha = 2r
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Size:
    description: str
    text: dict
    vision: dict
    image_token_id: int
    pinpoints: list
    image_hw: tuple[int, int]  # (height, width) of every benchmark image
    question_tokens: int  # text tokens of the prompt (BOS, [INST], question, [/INST]); image tokens come on top
    answer_median: int
    answer_sigma: float  # lognormal sigma of the answer lengths
    answer_range: tuple[int, int]
    default_pairs_per_step: tuple[int, ...] = (1,)


_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_MISTRAL_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    sliding_window=None,
    tie_word_embeddings=False,
)
_CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

_SIZE_7B = Size(
    description="llava-v1.6-mistral-7b architecture (Mistral-7B + CLIP ViT-L/14-336, anyres), random weights",
    text=_MISTRAL_7B,
    vision=_CLIP_L_336,
    image_token_id=32000,
    pinpoints=_PINPOINTS_336,
    image_hw=(480, 640),
    question_tokens=40,
    answer_median=150,
    answer_sigma=0.5,
    answer_range=(16, 512),
)

SIZES = {
    "7b": _SIZE_7B,
    "small": Size(
        description="LLaVA-NeXT structure scaled down for CPU (d=128, 2 layers, 2048 vocab; ViT 112px/14, 2 layers)",
        text=dict(
            _MISTRAL_7B,
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=448,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=8192,
        ),
        vision=dict(
            _CLIP_L_336,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
            projection_dim=64,
        ),
        image_token_id=2000,
        pinpoints=[[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]],
        image_hw=(160, 213),  # 640x480 scaled by 1/3: 2x2 grid + base image, unpadded like the 7b's
        question_tokens=40,
        answer_median=32,
        answer_sigma=0.5,
        answer_range=(8, 128),
        default_pairs_per_step=(1, 4, 8),
    ),
    "7b-tiny": replace(
        _SIZE_7B,
        description="7b input geometry (640x480 -> 2340 image tokens, answers ~150) with tiny widths, for CPU checks",
        text=dict(
            _MISTRAL_7B,
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
        ),
        vision=dict(_CLIP_L_336, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_token_id=500,
    ),
}


def build_config(size: Size):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    text = MistralConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **size.text)
    vision = CLIPVisionConfig(num_channels=3, **size.vision)
    patches = size.vision["image_size"] // size.vision["patch_size"]
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=size.image_token_id,
        image_grid_pinpoints=size.pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        image_seq_length=patches * patches,
    )


def build_image_processor(size: Size):
    """LLaVA-NeXT 1.6 preprocessing (llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config), scaled to the size."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import PILImageResampling

    crop = size.vision["image_size"]
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=size.pinpoints,
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
    )


def build_model(size: Size, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-weight LLaVA-NeXT instantiated directly on `device` in `dtype` (a 7B never exists on the host)."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(
            build_config(size), dtype=dtype, attn_implementation="sdpa"
        )
    return model


def count_image_tokens(model, image_inputs: dict) -> int:
    """Image tokens of one image by the model's own rule: the length of its packed image features."""
    hf = unwrap(model)
    with torch.no_grad():
        features = hf.get_image_features(
            pixel_values=image_inputs["pixel_values"].to(hf.device, hf.dtype),
            image_sizes=image_inputs["image_sizes"].to(hf.device),
        ).pooler_output
    return int(features[0].shape[0])


def answer_length(size: Size, rng: np.random.Generator) -> int:
    lo, hi = size.answer_range
    return int(np.clip(np.rint(rng.lognormal(mean=math.log(size.answer_median), sigma=size.answer_sigma)), lo, hi))


def make_pairs(model, size: Size, n: int, seed: int, rejected_per_prompt: int = 1) -> list[EncodedPair]:
    """`n` pairs, each with its own random-pixel image of `size.image_hw` and random token ids.

    Prompt: BOS, a few [INST] tokens, the image tokens, the rest of the question; answers (lognormal lengths,
    chosen and rejected drawn independently) end in EOS. Pair i depends only on (seed, i); its rejected answers
    2..k are drawn after everything else, so `with_rejected` of these pairs at a smaller k gives the same pairs.
    """
    from PIL import Image

    processor = build_image_processor(size)
    vocab, image_id = size.text["vocab_size"], size.image_token_id
    height, width = size.image_hw
    n_image = None
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])

        def tokens(k):  # ordinary text ids: not BOS/EOS/PAD, not the image token
            ids = rng.integers(3, vocab - 1, size=k)
            return np.where(ids >= image_id, ids + 1, ids).tolist()

        chosen_len, rejected_len = answer_length(size, rng), answer_length(size, rng)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        inputs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        image_inputs = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
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


def crops_per_image(size: Size, image_inputs: dict) -> int:
    """Vision-tower crops of one image (anyres grid + base image): what the vision FLOPs scale with."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(
        image_inputs["image_sizes"][0].tolist(), size.pinpoints, size.vision["image_size"]
    )
