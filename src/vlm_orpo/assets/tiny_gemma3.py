"""A tiny, randomly initialised Gemma 3 (SigLIP vision tower + Gemma 3 text model), built offline from a seed.

What makes it Gemma 3 for the packed forward, kept small enough to show in a test:
- sliding-window layers around a full-attention one (`LAYER_TYPES`), with a window of `SLIDING_WINDOW` = 24
  tokens, shorter than the image block and than a prompt (about 90 tokens), so the window cuts into every pair;
- 64 image tokens per image (a 128x128 input, the synthetic images whole, 16x16 patches of 8 pixels,
  average-pooled 2x2 to an 8x8 grid), which attend to each other bidirectionally (the processor's
  `token_type_ids` mark them);
- Gemma's chat format and special tokens (`<bos>`, `<start_of_turn>`, `<end_of_turn>`, `<start_of_image>`, ...),
  a `Gemma3Processor` that expands `<start_of_image>` to `\\n\\n<start_of_image>` + 64 x `<image_soft_token>` +
  `<end_of_image>\\n\\n`, and tied input/output embeddings, as the released checkpoints have.

So that the quickstart learns its colour questions (issue 12; 70/60/56% held-out accuracy over training seeds
42/1/2 with a 64x64 input pooled to 16 tokens, SigLIP's own init, a 0.1 projector, a scalar of 32 and two layers;
90/96/94/98/94% over seeds 42/1/2/3/4 now), each change measured over training seeds on the quickstart:
- the images whole: 16x16 patches of 8 pixels pooled to 64 tokens (pooled to 16 tokens, or not pooled: 256, it
  learnt less);
- the SigLIP tower and the projector drawn at HF's usual 0.02 (`VISION_INIT`; SigLIP's own xavier/lecun init is
  ~0.1 at width 64, and the other tiny towers are at 0.02);
- `query_pre_attn_scalar` 8, not the head dimension 32: Gemma's q/k norms, whose scales LoRA does not train, bound
  the scores at 32 / sqrt(scalar), too flat at 32 to single out a small shape's few tokens (4 was too sharp).
- three layers, sliding / full / sliding (`LAYER_TYPES`), not sliding / full: an answer's window of 24 reaches
  back over the question to only the image's last row or two of tokens, so the answers see most of the image
  only in the full layer, and with that layer last only its MLP followed the read of the image
  (90/92/78/92/92%; sliding / full / full: 96/100/96/90/96%).
A sliding layer stays first, as in the released models, so the image tokens the full layer reads have been through
the sliding layer's image-block rule (the answers' log-probs depend on it, which the tests check), and the last
layer is sliding, so an answer's window sits right at the output.

About 0.68M parameters (~2.7 MB float32).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.tiny_model import TEXT_INIT, VISION_INIT, redraw_matrices

__all__ = ["CHAT_TEMPLATE", "LAYER_TYPES", "SPECIAL_TOKENS", "SLIDING_WINDOW", "MM_TOKENS_PER_IMAGE", "build_gemma3"]

IMAGE_SIZE = 128  # SigLIP input size: the synthetic 128x128 images whole
PATCH_SIZE = 8  # 16x16 = 256 patches, pooled with a 2x2 kernel to 64 tokens
MM_TOKENS_PER_IMAGE = 64  # must be a square whose side divides IMAGE_SIZE // PATCH_SIZE (the avg-pool projector)
SLIDING_WINDOW = 24
# mostly sliding, as released (5 sliding : 1 full); the answers see most of the image only in the full layer
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
QUERY_PRE_ATTN_SCALAR = 8  # attention scores are q.k / sqrt(8), q and k RMS-normed per head of 32

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"  # ids 0..3, as in Gemma's own vocabulary
SOT, EOT = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, SOT, EOT, BOI, EOI, IMAGE]

# Gemma 3's template (google/gemma-3-4b-it), with the assistant text wrapped in {% generation %}:
#   "<bos><start_of_turn>user\n[SYSTEM\n\n]<start_of_image>QUESTION<end_of_turn>\n<start_of_turn>model\n"
#   assistant: "ANSWER<end_of_turn>\n"
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}"
    "{%- if role == 'model' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def gemma_tokenizer(special_tokens: list[str], chat_template: str, image: str, sot: str, eot: str, extra: dict):
    """Byte-level BPE with a Gemma's special tokens, trained on chats in its turn format (`sot`/`eot` around each
    turn, `image` as the processor expands an image); BOS prepended like Gemma's (`add_special_tokens=True`).
    Gemma 3's and Gemma 4's tiny tokenizers (their special tokens differ, not their shape)."""
    from tokenizers import processors

    from vlm_orpo.assets.tiny_model import tokenizer_corpus, train_bpe, wrap_tokenizer

    lines = tokenizer_corpus()
    chat = [f"{BOS}{sot}user\n{image}{q}{eot}\n{sot}model\n{a}{eot}\n" for q, a in zip(lines[:40], lines[40:80])]
    tok = train_bpe(special_tokens, chat)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return wrap_tokenizer(
        tok, chat_template, bos_token=BOS,
        eos_token=eot,  # the end of a model turn: what an answer ends with and generation stops at
        pad_token=PAD, unk_token=UNK,
        extra_special_tokens={**extra, "sot_token": sot, "eot_token": eot},
    )


def _tokenizer():
    image = f"\n\n{BOI}{IMAGE * MM_TOKENS_PER_IMAGE}{EOI}\n\n"
    return gemma_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, image, SOT, EOT,
                           {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE})


def _processor(hf_tok):
    from transformers import Gemma3Processor
    from transformers.utils import is_torchvision_available

    # both backends save image_processor_type "Gemma3ImageProcessor"; AutoProcessor picks the installed one
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        from transformers import Gemma3ImageProcessor as _IP
    else:
        from transformers import Gemma3ImageProcessorPil as _IP

    image_processor = _IP(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    return Gemma3Processor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
                           image_seq_length=MM_TOKENS_PER_IMAGE)


def _config(hf_tok):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    ids = {name: hf_tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=QUERY_PRE_ATTN_SCALAR,
        layer_types=LAYER_TYPES,
        sliding_window=SLIDING_WINDOW,
        max_position_embeddings=4096,
        initializer_range=TEXT_INIT,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE],
        initializer_range=TEXT_INIT,
        tie_word_embeddings=True,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids[BOS], ids[EOT], ids[PAD]
    return config


def build_gemma3(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Gemma 3 (processor + model) into `out_dir` (replaced atomically) and return it."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        hf_tok = _tokenizer()
        processor = _processor(hf_tok)
        config = _config(hf_tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Gemma3ForConditionalGeneration(config).to(torch.float32)
            # transformers starts the projector at zero (image tokens would carry nothing); a trained checkpoint
            # never has that, and the tests need images that matter
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=VISION_INIT)
            # SigLIP's own init mixes a random tower's tokens so much that a small shape's colour hardly survives
            redraw_matrices(model.model.vision_tower)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=[config.eos_token_id, hf_tok.convert_tokens_to_ids(EOS)],
            pad_token_id=config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(
            json.dumps({"kind": "tiny-gemma3", "seed": seed, "version": 1}, indent=2) + "\n"
        )
    return out_dir
