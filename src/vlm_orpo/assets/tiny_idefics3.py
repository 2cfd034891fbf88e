"""Tiny, randomly initialised Idefics3 and SmolVLM (SigLIP-style vision tower, pixel-shuffle connector, Llama).

Built offline and deterministically from a seed, like `tiny_model`: a byte-level BPE tokenizer (`train_bpe`)
with the family's control tokens (`<fake_token_around_image>`, `<image>`, `<global-img>`, `<row_i_col_j>`,
`<end_of_utterance>`), the family's chat template (`User:<image>QUESTION<end_of_utterance>\\nAssistant:` and
` ANSWER<end_of_utterance>\\n`; Idefics3 opens with `<|begin_of_text|>`, SmolVLM with `<|im_start|>`) and about
0.67M parameters (~2.7 MB float32).

Image splitting as in the real models, scaled down: an image's longest edge is resized to 128, cut into 64x64
crops, and a 64x64 global image is appended; each crop is 8x8 patches of 8 pixels, pixel-shuffled by 2 into 16
image tokens. A 128x128 image is 2x2 crops + global (5 crops, 96 prompt tokens with the row/col markers), a
128x64 one 1x2 + global (3 crops).

SmolVLM's own processor class (`SmolVLMProcessor`) cannot be built or loaded in transformers 5.17 without
torchvision (its video processor is a torchvision backend) and num2words, so the tiny SmolVLM ships
`Idefics3Processor` with `SmolVLMImageProcessor(Pil)`: the same image splitting and the same expanded image
prompt (`_prompt_split_image` writes exactly Idefics3's string), and it loads with `AutoProcessor` offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.tiny_model import TEXT_INIT, tokenizer_corpus, train_bpe, wrap_tokenizer

__all__ = ["CHAT_TEMPLATES", "SPECIAL_TOKENS", "build_idefics3", "build_smolvlm", "build_tokenizer"]

CROP_SIZE = 64  # max_image_size: crops and the global image; the vision tower's image_size
LONGEST_EDGE = 2 * CROP_SIZE  # size: images are resized to this longest edge before splitting (128 -> 2x2 crops)
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (CROP_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 16 image tokens per crop

UNK, PAD = "<unk>", "<pad>"
BEGIN_OF_TEXT, IM_START = "<|begin_of_text|>", "<|im_start|>"  # Idefics3's (Llama 3) and SmolVLM's BOS
END_OF_UTTERANCE = "<end_of_utterance>"  # ends every turn; the EOS of both
IMAGE, FAKE_IMAGE, GLOBAL_IMAGE = "<image>", "<fake_token_around_image>", "<global-img>"
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # the processor looks up all 36
SPECIAL_TOKENS = [UNK, PAD, BEGIN_OF_TEXT, IM_START, END_OF_UTTERANCE, IMAGE, FAKE_IMAGE, GLOBAL_IMAGE, *ROW_COL]


def _chat_template(bos: str) -> str:
    """The hub template of Idefics3 / SmolVLM-Instruct, made total: content may be a string, the assistant's
    reply (a space, the text, `<end_of_utterance>`) is wrapped in {% generation %}, and `Role:` is followed by a
    space unless the turn opens with an image, as on the hub."""
    return (
        bos
        + "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
        "{%- elif message['content'] is none -%}"
        "{%- set parts = [] -%}"
        "{%- else -%}"
        "{%- set parts = message['content'] -%}"
        "{%- endif -%}"
        "{%- if message['role'] not in ('system', 'user', 'assistant') -%}"
        "{{- raise_exception('Only system, user and assistant roles are supported!') -}}"
        "{%- endif -%}"
        "{{- message['role'] | capitalize -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- ':' -}}"
        "{%- generation -%}"
        "{{- ' ' -}}"
        "{%- for part in parts | selectattr('type', 'equalto', 'text') -%}"
        "{{- part['text'] -}}"
        "{%- endfor -%}"
        "{{- '" + END_OF_UTTERANCE + "' -}}"
        "{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{{- ':' if parts and parts[0]['type'] == 'image' else ': ' -}}"
        "{%- for part in parts -%}"
        "{%- if part['type'] == 'text' -%}"
        "{{- part['text'] -}}"
        "{%- elif part['type'] == 'image' -%}"
        "{{- '" + IMAGE + "' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- '" + END_OF_UTTERANCE + "\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- 'Assistant:' -}}"
        "{%- endif -%}"
    )


CHAT_TEMPLATES = {"idefics3": _chat_template(BEGIN_OF_TEXT), "smolvlm": _chat_template(IM_START)}
_BOS = {"idefics3": BEGIN_OF_TEXT, "smolvlm": IM_START}


def build_tokenizer():
    """The `tokenizers.Tokenizer` of both tiny models (no BOS added: the chat templates write it); deterministic."""
    lines = tokenizer_corpus()
    chat = []
    for k, (q, a) in enumerate(zip(lines[:40], lines[40:80])):
        bos = (BEGIN_OF_TEXT, IM_START)[k % 2]
        chat.append(f"{bos}User:{IMAGE}{q}{END_OF_UTTERANCE}\nAssistant: {a}{END_OF_UTTERANCE}\n")
    # the expanded image prompt: row ends and the blank line before the global image
    chat.append(f"{FAKE_IMAGE}{ROW_COL[0]}{IMAGE}{FAKE_IMAGE}{ROW_COL[1]}{IMAGE}\n{FAKE_IMAGE}{ROW_COL[6]}{IMAGE}\n\n"
                f"{FAKE_IMAGE}{GLOBAL_IMAGE}{IMAGE}{FAKE_IMAGE}")
    return train_bpe(SPECIAL_TOKENS, chat)


def _wrap_tokenizer(tok, variant: str):
    return wrap_tokenizer(
        tok, CHAT_TEMPLATES[variant], bos_token=_BOS[variant], eos_token=END_OF_UTTERANCE, pad_token=PAD,
        unk_token=UNK,
        # SmolVLMProcessor reads these names off the tokenizer (Idefics3Processor hard-codes the same strings)
        extra_special_tokens={
            "image_token": IMAGE,
            "fake_image_token": FAKE_IMAGE,
            "global_image_token": GLOBAL_IMAGE,
            "end_of_utterance_token": END_OF_UTTERANCE,
        },
    )


def _image_processor(variant: str):
    from transformers.utils import is_torchvision_available

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    allow_processors_without_torchvision()
    # transformers 5 saves both backends under one image_processor_type; AutoProcessor picks the installed one
    if variant == "smolvlm":
        if is_torchvision_available():  # pragma: no cover - depends on installed extras
            from transformers.models.smolvlm import SmolVLMImageProcessor as IP
        else:
            from transformers.models.smolvlm import SmolVLMImageProcessorPil as IP
    elif is_torchvision_available():  # pragma: no cover
        from transformers.models.idefics3 import Idefics3ImageProcessor as IP
    else:
        from transformers.models.idefics3 import Idefics3ImageProcessorPil as IP
    return IP(
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": CROP_SIZE},
        do_image_splitting=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
        image_mean=[0.5, 0.5, 0.5],  # a real pixel never normalises to exactly 0, so only padded crops are all 0
        image_std=[0.5, 0.5, 0.5],
    )


def _build_processor(hf_tok, variant: str):
    from transformers import Idefics3Processor

    return Idefics3Processor(
        image_processor=_image_processor(variant),
        tokenizer=hf_tok,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATES[variant],
    )


def _build_config(hf_tok, variant: str):
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig

    config_class, vision_class = (
        (SmolVLMConfig, SmolVLMVisionConfig) if variant == "smolvlm" else (Idefics3Config, Idefics3VisionConfig)
    )
    vision = vision_class(
        hidden_size=64,  # half this learns the quickstart's colours too slowly to be sure of it in 64 steps
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CROP_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=4096,
        initializer_range=TEXT_INIT,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=hf_tok.convert_tokens_to_ids(IMAGE),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        pad_token_id=hf_tok.pad_token_id,
    )
    config.bos_token_id = hf_tok.bos_token_id
    config.eos_token_id = hf_tok.eos_token_id
    return config


def _build(out_dir: Path, seed: int, variant: str) -> Path:
    import torch
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    model_class = SmolVLMForConditionalGeneration if variant == "smolvlm" else Idefics3ForConditionalGeneration
    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        hf_tok = _wrap_tokenizer(build_tokenizer(), variant)
        processor = _build_processor(hf_tok, variant)
        config = _build_config(hf_tok, variant)
        with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is left alone
            torch.manual_seed(seed)
            model = model_class(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
            pad_token_id=hf_tok.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(
            json.dumps({"kind": f"tiny-{variant}", "seed": seed, "version": 1}, indent=2) + "\n"
        )
    return out_dir


def build_idefics3(out_dir: Path, seed: int = 0) -> Path:
    """The tiny Idefics3 (processor + model) in `out_dir`, built atomically; an existing `out_dir` is replaced."""
    return _build(out_dir, seed, "idefics3")


def build_smolvlm(out_dir: Path, seed: int = 0) -> Path:
    """The tiny SmolVLM (processor + model) in `out_dir`, built atomically; an existing `out_dir` is replaced."""
    return _build(out_dir, seed, "smolvlm")
