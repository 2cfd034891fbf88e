"""Tiny, randomly initialised LLaVA-like models: vision features merged into a 1D-rope text model.

Each is built offline and deterministically from a seed, with the family's own processor class (the PIL image
processors: no torchvision), a byte-level BPE tokenizer (`train_bpe`) holding the family's special tokens, and a
chat template in the family's format whose assistant part is wrapped in `{% generation %}`:

- LLaVA-OneVision (SigLIP + Qwen2): `<|im_start|>user <image>\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\n`.
  AnyRes: 64x64 crops of 16x16 patches (16 tokens each), grids up to 4x4 crops, `anyres_max_9`. A 128x128
  image is a 2x2 grid: 16 base + 8x8 grid + 8 newline = 88 image tokens; 256x256 exercises the max-9 downsampling.
- InternVL (InternViT + Qwen2): `<|im_start|>user\\n<IMG_CONTEXT>\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\n`,
  the processor expands `<IMG_CONTEXT>` to `<img>` + 16 `<IMG_CONTEXT>` per 64x64 tile + `</img>`. A 128x128
  image is a 2x2 tiling plus the thumbnail: 5 tiles, 82 image tokens.
- Mistral 3 (Pixtral + Mistral): `<s>[INST][IMG]QUESTION[/INST]ANSWER</s>`, `[IMG]` expanded row by row with
  `[IMG_BREAK]` and a closing `[IMG_END]`: 16x16 patches after 2x2 merging, longest edge 128, so a 128x128 image
  is 8 rows of 8 tokens = 72 image tokens, and other sizes keep their aspect ratio.

Without torchvision: OneVision's and InternVL's processors need a video processor, which transformers 5.17 makes
only with torchvision, so a plain `BaseVideoProcessor` takes its place (images only); `PixtralProcessor`'s module
imports torchvision. `modeling.processor_compat` makes both load (a no-op with torchvision).

About 0.7M parameters each (~2.8 MB float32); the text model at `TEXT_INIT` (0.1), as in `tiny_model`. Parts
of the image side are drawn again at HF's usual 0.02 (`VISION_INIT`, as the tiny Qwen-VL towers and mergers are), so
that the quickstart learns its colour questions (issue 12): InternVL's and Mistral 3's projectors (transformers draws
them at the text model's 0.1) and OneVision's SigLIP tower (SigLIP's own xavier/lecun init is ~0.1 at width 64;
InternViT and Pixtral are already at 0.02). Before, they reached 58-86% held-out accuracy over three training seeds;
OneVision with a 0.02 projector too learnt less than with the tower alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.tiny_model import TEXT_INIT, redraw_matrices, tokenizer_corpus, train_bpe, wrap_tokenizer

__all__ = [
    "INTERNVL_CHAT_TEMPLATE",
    "MISTRAL3_CHAT_TEMPLATE",
    "ONEVISION_CHAT_TEMPLATE",
    "build_internvl",
    "build_llava_onevision",
    "build_mistral3",
]

# Qwen2's chat markers: <|endoftext|> pads, <|im_end|> ends a turn (EOS); no BOS
PAD_QWEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The content of a message as a list of parts (a plain string is one text part), shared by the templates below.
_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- elif message['content'] is none -%}"
    "{%- set parts = [] -%}"
    "{%- else -%}"
    "{%- set parts = message['content'] -%}"
    "{%- endif -%}"
)
_TEXTS = "{%- for part in parts | selectattr('type', 'equalto', 'text') -%}{{- part['text'] -}}{%- endfor -%}"


def _im_start_template(image: str) -> str:
    """Qwen2's `<|im_start|>ROLE\\n ... <|im_end|>\\n` turns; a user turn's images first, each written as `image`.

    The assistant turn is `<|im_start|>assistant\\n` (exactly the generation prompt) + the `{% generation %}`
    wrapped answer and `<|im_end|>`, so a rendered answer starts right after the rendered prompt."""
    return (
        "{%- for message in messages -%}"
        + _PARTS
        + "{%- if message['role'] == 'assistant' -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- generation -%}" + _TEXTS + "{{- '<|im_end|>' -}}{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- elif message['role'] in ['user', 'system'] -%}"
        "{{- '<|im_start|>' + message['role'] -}}"
        + image
        + _TEXTS
        + "{{- '<|im_end|>\\n' -}}"
        "{%- else -%}"
        "{{- raise_exception('Only system, user and assistant roles are supported!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# llava-hf/llava-onevision-qwen2-*-ov-hf: "<|im_start|>user <image>\nQUESTION<|im_end|>\n" (role, a space, the
# images, then "\n" + text). The hub's assistant turn is "<|im_start|>assistant \n..." while its generation prompt
# is "<|im_start|>assistant\n"; here both are the latter, so the trained answer follows the served prompt.
ONEVISION_CHAT_TEMPLATE = _im_start_template(
    "{%- set images = parts | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- if images -%}{{- ' ' -}}{%- for part in images -%}{{- '<image>' -}}{%- endfor -%}{%- endif -%}"
    "{{- '\\n' -}}"
)

# OpenGVLab/InternVL3-*-hf (convert_internvl_weights_to_hf.py): "<|im_start|>user\n<IMG_CONTEXT>\nQUESTION<|im_end|>\n"
INTERNVL_CHAT_TEMPLATE = _im_start_template(
    "{{- '\\n' -}}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') -%}{{- '<IMG_CONTEXT>\\n' -}}{%- endfor -%}"
)

# mistralai/Mistral-Small-3.1-24B-Instruct-2503: "<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]TEXT[IMG][/INST]ANSWER</s>"
# (the content's parts in order; here the image comes first, as PairEncoder puts it). The answer follows [/INST]
# directly; `add_generation_prompt` adds nothing.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    + _PARTS
    + "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' -}}" + _TEXTS + "{{- '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '[IMG]' -}}{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}" + _TEXTS + "{{- eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _video_processor(family_class: str, size: int):
    """The family's video processor (torchvision), else a plain `BaseVideoProcessor` holding its place."""
    import transformers
    from transformers.utils import is_torchvision_available

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    allow_processors_without_torchvision()
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        return getattr(transformers, family_class)(size={"height": size, "width": size})
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor(size={"height": size, "width": size})


def _chat_lines(fmt: str) -> list[str]:
    """Chat-formatted samples so that BPE learns the pieces around a family's markers."""
    lines = tokenizer_corpus()
    return [fmt.format(q=q, a=a) for q, a in zip(lines[:40], lines[40:80])]


def _qwen2_text(hf_tok, hidden: int = 128):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(hf_tok),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=4096,
        use_sliding_window=False,
        initializer_range=TEXT_INIT,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )


def _save(out_dir: Path, kind: str, seed: int, processor, model_class, config, small_init: str) -> Path:
    """Seeded model init (the caller's RNG untouched), then model + processor saved atomically with the marker.

    Every matrix of `model.model.<small_init>` (the projector or the vision tower) is drawn again from
    N(0, VISION_INIT); its biases and norms stay as transformers made them."""
    import torch
    from transformers import GenerationConfig

    tok = processor.tokenizer
    for c in (config, config.get_text_config()):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config).to(torch.float32)
            redraw_matrices(getattr(model.model, small_init))
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(json.dumps({"kind": kind, "seed": seed, "version": 1}, indent=2) + "\n")
    return out_dir


# --- LLaVA-OneVision ---------------------------------------------------------------------------------------------

OV_CROP, OV_PATCH = 64, 16
# every grid of 64x64 crops up to 4x4 (the hub's goes to 6x6 crops of 384); 4x4 is past anyres_max_9's budget
OV_PINPOINTS = [[OV_CROP * h, OV_CROP * w] for h in range(1, 5) for w in range(1, 5)]


def build_llava_onevision(out_dir: Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision (SigLIP + Qwen2) with `LlavaOnevisionProcessor` into `out_dir`."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    image, video = "<image>", "<video>"
    tok = train_bpe([PAD_QWEN, IM_START, IM_END, image, video],
                    _chat_lines(f"{IM_START}user {image}\n{{q}}{IM_END}\n{IM_START}assistant\n{{a}}{IM_END}\n"))
    hf_tok = wrap_tokenizer(tok, ONEVISION_CHAT_TEMPLATE, eos_token=IM_END, pad_token=PAD_QWEN,
                   extra_special_tokens={"image_token": image, "video_token": video})
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": OV_CROP, "width": OV_CROP},
        image_grid_pinpoints=OV_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        video_processor=_video_processor("LlavaOnevisionVideoProcessor", OV_CROP),
        num_image_tokens=(OV_CROP // OV_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
        image_token=image,
        video_token=video,
        vision_aspect_ratio="anyres_max_9",
    )
    vision = SiglipVisionConfig(
        image_size=OV_CROP, patch_size=OV_PATCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_qwen2_text(hf_tok),
        image_token_index=hf_tok.convert_tokens_to_ids(image),
        video_token_index=hf_tok.convert_tokens_to_ids(video),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return _save(out_dir, "tiny-llava-onevision", seed, processor, LlavaOnevisionForConditionalGeneration, config,
                 small_init="vision_tower")


# --- InternVL ----------------------------------------------------------------------------------------------------

IVL_TILE, IVL_PATCH, IVL_MAX_TILES = 64, 8, 4
IVL_TOKENS_PER_TILE = (IVL_TILE // IVL_PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5


def build_internvl(out_dir: Path, seed: int = 0) -> Path:
    """A tiny InternVL (InternViT + Qwen2) with `InternVLProcessor` into `out_dir`."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    start, end, context, video = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
    tok = train_bpe([PAD_QWEN, IM_START, IM_END, start, end, context, video],
                    _chat_lines(f"{IM_START}user\n{start}{context}{end}\n{{q}}{IM_END}\n{IM_START}assistant\n{{a}}{IM_END}\n"))
    hf_tok = wrap_tokenizer(tok, INTERNVL_CHAT_TEMPLATE, eos_token=IM_END, pad_token=PAD_QWEN, extra_special_tokens={
        "start_image_token": start, "end_image_token": end, "context_image_token": context, "video_token": video,
    })
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IVL_TILE, "width": IVL_TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=IVL_MAX_TILES,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        video_processor=_video_processor("InternVLVideoProcessor", IVL_TILE),
        image_seq_length=IVL_TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    vision = InternVLVisionConfig(
        image_size=IVL_TILE, patch_size=IVL_PATCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, use_mean_pooling=False,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_qwen2_text(hf_tok),
        image_token_id=hf_tok.convert_tokens_to_ids(context),
        image_seq_length=IVL_TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return _save(out_dir, "tiny-internvl", seed, processor, InternVLForConditionalGeneration, config,
                 small_init="multi_modal_projector")


# --- Mistral 3 ---------------------------------------------------------------------------------------------------

M3_LONGEST, M3_PATCH, M3_MERGE = 128, 8, 2  # 128x128: 8x8 merged tokens + 8 [IMG_BREAK]/[IMG_END] = 72 image tokens


def build_mistral3(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Mistral 3 (Pixtral + Mistral) with `PixtralProcessor` into `out_dir`."""
    from tokenizers import processors
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    allow_processors_without_torchvision()
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    unk, bos, eos, pad = "<unk>", "<s>", "</s>", "<pad>"
    img, brk, img_end = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
    inst, inst_end, sys, sys_end = "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"
    tok = train_bpe([unk, bos, eos, pad, img, brk, img_end, inst, inst_end, sys, sys_end],
                    _chat_lines(f"{bos}{inst}{{q}}{img}{inst_end}{{a}}{eos}"))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    hf_tok = wrap_tokenizer(tok, MISTRAL3_CHAT_TEMPLATE, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                   extra_special_tokens={"image_token": img})
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": M3_LONGEST}, patch_size=M3_PATCH,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = PixtralProcessor(
        image_processor=image_processor, tokenizer=hf_tok, patch_size=M3_PATCH, spatial_merge_size=M3_MERGE,
        chat_template=MISTRAL3_CHAT_TEMPLATE, image_token=img, image_break_token=brk, image_end_token=img_end,
    )
    vision = PixtralVisionConfig(
        image_size=M3_LONGEST, patch_size=M3_PATCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, head_dim=16,
    )
    text = MistralConfig(
        vocab_size=len(hf_tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, max_position_embeddings=4096, sliding_window=None,
        initializer_range=TEXT_INIT, tie_word_embeddings=False,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=hf_tok.convert_tokens_to_ids(img),
        spatial_merge_size=M3_MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return _save(out_dir, "tiny-mistral3", seed, processor, Mistral3ForConditionalGeneration, config,
                 small_init="multi_modal_projector")
