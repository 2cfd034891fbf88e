"""Tiny, randomly initialised Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (`bundled:qwen2_vl`, ...).

Built offline and deterministically from a seed, like `tiny_model`'s LLaVA-NeXT: a byte-level BPE tokenizer
(`train_bpe`) with Qwen's special tokens, the Qwen chat format, the family's own processor class with the PIL
image processor (`Qwen2VLImageProcessorPil`, what `AutoProcessor` picks without torchvision), and the family's
`...ForConditionalGeneration` with under 1M parameters (about 3 MB float32).

Chat format (as the Qwen-VL hub templates, without the default system turn):
    user:      "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>QUESTION<|im_end|>\\n"
    assistant: "<|im_start|>assistant\\nANSWER<|im_end|>\\n"          (eos = <|im_end|>, pad = <|endoftext|>)

Dynamic resolution: patches of 8 pixels, 2x2 merged into one token, at most 128x128 pixels after resizing, so a
128x128 image becomes 16x16 patches = 64 image tokens, and a 128x64 image 16x8 patches = 32 tokens.

Video: every Qwen-VL processor has a video processor as a required part, and transformers 5.17 builds Qwen's
video processors with torchvision only. With torchvision the tiny model gets the family's own video processor;
without it a plain `BaseVideoProcessor` holds its place (images only), made loadable by
`modeling.processor_compat`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.tiny_model import TEXT_INIT, VISION_INIT

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_qwen2_vl", "build_qwen2_5_vl", "build_qwen3_vl", "build_qwen3_vl_moe",
           "build_tokenizer"]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]  # ids 0..6

PATCH_SIZE = 8
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MIN_PIXELS = 32 * 32
# the synthetic images' 128x128 kept whole: at 96x96 (36 tokens of 16x16 pixels) a small shape is mostly blended with
# the background in its tokens, and the quickstart learned its colour too slowly (Qwen2.5-VL: 54% held-out accuracy)
MAX_PIXELS = 128 * 128

# The Qwen-VL format; content may be a string or a list of parts, looped over as `message['content']` itself, as
# the hub templates do (vLLM reads that loop to pass the parts, not a flattened string); the assistant turn is
# wrapped in {% generation %} so that `return_assistant_tokens_mask=True` works.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'text' -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def build_tokenizer():
    """The Qwen-style tokenizer (`tokenizers.Tokenizer`): no BOS, as Qwen's; deterministic."""
    from vlm_orpo.assets.tiny_model import tokenizer_corpus, train_bpe

    lines = tokenizer_corpus()
    chat = [
        f"{IM_START}user\n{VISION_START}{IMAGE_PAD}{VISION_END}{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n"
        for q, a in zip(lines[:40], lines[40:80])
    ]
    return train_bpe(SPECIAL_TOKENS, chat)


def _wrap_tokenizer(tok):
    from vlm_orpo.assets.tiny_model import wrap_tokenizer

    return wrap_tokenizer(tok, CHAT_TEMPLATE, eos_token=IM_END, pad_token=ENDOFTEXT,
                          extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD})


def _build_processor(family: str, hf_tok):
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.utils import is_torchvision_available

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    allow_processors_without_torchvision()
    qwen3 = family.startswith("qwen3_vl")
    mean, std = ([0.5] * 3, [0.5] * 3) if qwen3 else (list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))
    vision = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
                  image_mean=mean, image_std=std)
    # both image backends save image_processor_type "Qwen2VLImageProcessor"; AutoProcessor picks the installed one
    image_processor_class = (transformers.Qwen2VLImageProcessor if is_torchvision_available()  # pragma: no cover
                             else transformers.Qwen2VLImageProcessorPil)
    image_processor = image_processor_class(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **vision)
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        video_class = transformers.Qwen3VLVideoProcessor if qwen3 else transformers.Qwen2VLVideoProcessor
        video_processor = video_class(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS * 4}, **vision)
    else:
        from transformers.video_processing_utils import BaseVideoProcessor

        video_processor = BaseVideoProcessor(**vision)
    processor_class = {
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
        "qwen3_vl_moe": transformers.Qwen3VLProcessor,  # as the released Qwen3-VL-MoE checkpoints have
    }[family]
    return processor_class(image_processor=image_processor, tokenizer=hf_tok, video_processor=video_processor,
                           chat_template=CHAT_TEMPLATE)


# text decoder: about tiny_model's Mistral (hidden 128, 2 layers, GQA 4/2 heads of 32); vision: 2 blocks of 48
_TEXT = dict(
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    initializer_range=TEXT_INIT,
)


def _build_config(family: str, hf_tok):
    import transformers

    ids = {name: hf_tok.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
        ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END))}
    special = dict(bos_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    text = dict(_TEXT, vocab_size=len(hf_tok), **special)
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 32: 16 rotary frequencies over t, h, w
    vision = dict(depth=2, num_heads=3, in_channels=3, patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                  spatial_merge_size=MERGE_SIZE, initializer_range=VISION_INIT)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        vision.update(embed_dim=48, hidden_size=_TEXT["hidden_size"], mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        # windows of 32 pixels = 2x2 merged tokens; the second block attends over the whole image
        vision.update(hidden_size=48, intermediate_size=96, out_hidden_size=_TEXT["hidden_size"], window_size=32,
                      fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    elif family.startswith("qwen3_vl"):
        # Qwen3-VL interleaves t, h, w over the frequencies; 6 + 5 + 5 = head_dim / 2
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}
        text["head_dim"] = head_dim
        # deepstack: the first block's merged features are added to the first decoder layer's image positions
        vision.update(hidden_size=48, intermediate_size=96, out_hidden_size=_TEXT["hidden_size"],
                      num_position_embeddings=64, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")
        if family == "qwen3_vl_moe":
            # the second decoder layer's MLP a router over 4 experts, 2 per token (as many weights as the dense MLP);
            # the first stays dense (`mlp_only_layers`): LoRA's all-linear cannot adapt the experts, which are
            # parameters, and with attention alone the quickstart learnt little (68/62/62% over seeds 42/1/2)
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                        mlp_only_layers=[0])
            config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
        else:
            config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    else:  # pragma: no cover - TINY_MODELS names only the four
        raise ValueError(f"no tiny Qwen model {family!r}")
    for key, value in special.items():
        setattr(config, key, value)
    return config


def build(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model of `family` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe") into `out_dir`,
    atomically."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        hf_tok = _wrap_tokenizer(build_tokenizer())
        processor = _build_processor(family, hf_tok)
        config = _build_config(family, hf_tok)
        # Seeded init on the CPU generator; fork_rng leaves the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(json.dumps({
            "kind": f"tiny-{family.replace('_', '-')}", "seed": seed, "version": 1,
            "video_processor": type(processor.video_processor).__name__,
        }, indent=2) + "\n")
    return out_dir


def build_qwen2_vl(out_dir: Path, seed: int = 0) -> Path:
    return build("qwen2_vl", out_dir, seed)


def build_qwen2_5_vl(out_dir: Path, seed: int = 0) -> Path:
    return build("qwen2_5_vl", out_dir, seed)


def build_qwen3_vl(out_dir: Path, seed: int = 0) -> Path:
    return build("qwen3_vl", out_dir, seed)


def build_qwen3_vl_moe(out_dir: Path, seed: int = 0) -> Path:
    return build("qwen3_vl_moe", out_dir, seed)
