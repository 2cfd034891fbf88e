"""A tiny, randomly initialised Gemma 4 (Gemma 4 vision encoder + Gemma 4 text model, no audio), built offline from
a seed.

What makes it Gemma 4 for the packed forward, kept small enough to show in a test:
- use_bidirectional_attention "vision", as the released image-text checkpoints: image tokens (the processor's
  `mm_token_type_ids`) attend to each other both ways, but only in the sliding-attention layers (the full-attention
  layers are causal, unlike Gemma 3's);
- a sliding layer first, then two full-attention ones (`LAYER_TYPES`; transformers makes the last layer full
  attention whatever the config says), with a window of `SLIDING_WINDOW` = 24 tokens, shorter than the image block
  and than a prompt (about 90 tokens), so the window cuts into every pair;
- the last layer shares the K/V of the full layer before it (`num_kv_shared_layers` 1);
- per-layer inputs (PLE, `hidden_size_per_layer_input` 8): a per-token embedding per layer, looked up from the
  token ids (image tokens use the pad token's), plus a projection of the input embeddings;
- about 64 image tokens per image: Gemma 4 keeps an image's aspect ratio within a patch budget (its smallest, 70
  soft tokens: 280 patches), so a 128x128 synthetic image is 16x16 patches of 8 pixels, pooled 2x2 to 8x8 = 64
  tokens, and a 128x96 one 18x14 patches, 63 tokens; the processor pads every image to the 280 patches;
- Gemma 4's chat format and special tokens (`<bos>`, `<|turn>`, `<turn|>`, `<|image>`, `<|image|>`, `<image|>`,
  ...), a `Gemma4Processor` that expands `<|image|>` to `<|image>` + 64 x `<|image|>` + `<image|>`, and tied
  input/output embeddings, as the released checkpoints have.

The image side (vision encoder, its patch position table and the projector `embed_vision`) is drawn at
`VISION_INIT`, as the other tiny towers (transformers starts the position table at ones: no position at all), and
the vision layers' post-attention and post-feedforward norm scales start at `VISION_INIT` too: Gemma 4's vision
layers norm each block's output before adding it, so at one every block adds a random mix of unit size onto patch
embeddings of about 0.2, and a small shape's colour drowns (a pre-norm tower at 0.02 adds about 0.03). The
text layers' q and k norm scales start at `QK_NORM_SCALE` (scores q.k / 2); at one (q.k, bounded by 32) the
quickstart's held-out accuracy at training seed 42 was 56%. Over training seeds 42 / 1 / 2 / 3 / 4, with scores
q.k / 2: 92 / 94 / 78 / 82 / 92%; q.k / sqrt(8) (the tiny Gemma 3's sharpness): 80 / 80 / 90% (42 / 1 / 2);
q.k / sqrt(2): 78 / 74 / 72%. Vision post-norm scales at 0.1 learnt less (60 / 64 / 64%), four layers too (sliding /
full / sliding / full: 68 / 88 / 80%); without the KV-shared layer: 84 / 92 / 88% (it stays: released Gemma 4s
share).

About 0.71M parameters (~2.85 MB float32).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.tiny_gemma3 import BOS, EOS, PAD, UNK, gemma_tokenizer
from vlm_orpo.assets.tiny_model import TEXT_INIT, VISION_INIT, redraw_matrices

__all__ = ["CHAT_TEMPLATE", "LAYER_TYPES", "SPECIAL_TOKENS", "SLIDING_WINDOW", "MM_TOKENS_PER_IMAGE", "build_gemma4"]

PATCH_SIZE = 8  # 16x16 = 256 patches, pooled with a 2x2 kernel to 64 tokens
POOLING_KERNEL_SIZE = 2
MAX_SOFT_TOKENS = 70  # Gemma 4's smallest budget: at most 280 patches of 8 pixels; a 128x128 image takes 256
MM_TOKENS_PER_IMAGE = 64  # of a 128x128 image
POSITION_EMBEDDING_SIZE = 140  # the longest side the budget allows: (280 // 4) * 16 = 1120 pixels, 140 patches
SLIDING_WINDOW = 24
# a sliding layer first, as released; the last layer is full attention (transformers forces it)
LAYER_TYPES = ["sliding_attention", "full_attention", "full_attention"]
NUM_KV_SHARED_LAYERS = 1  # the last layer reuses the K/V of the full layer before it
PER_LAYER_INPUT = 8
# Gemma 4 scores attention as q.k with q and k RMS-normed per head (scaling 1), bounded by the head dimension 32 with
# the norms' scales at one. Its q and k norm scales start at 4 ** -0.25 each, so the scores are q.k / 2 (see above)
QK_NORM_SCALE = 4 ** -0.25

# PAD, EOS, BOS, UNK: as Gemma 3's (ids 0..3, as in Gemma's own vocabulary)
SOT, EOT = "<|turn>", "<turn|>"
BOI, IMAGE, EOI = "<|image>", "<|image|>", "<image|>"
BOA, AUDIO, EOA = "<|audio>", "<|audio|>", "<audio|>"  # no audio tower; Gemma4Processor needs the tokens named
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, SOT, EOT, BOI, IMAGE, EOI, BOA, AUDIO, EOA]
VIDEO = "<|video|>"  # added by Gemma4Processor itself, after the trained vocabulary

# Gemma 4's turn format, with the assistant text wrapped in {% generation %}:
#   "<bos><|turn>system\nSYSTEM<turn|>\n<|turn>user\n<|image|>QUESTION<turn|>\n<|turn>model\n"
#   assistant: "ANSWER<turn|>\n"
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if role == 'model' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)


def _tokenizer():
    return gemma_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, f"{BOI}{IMAGE * MM_TOKENS_PER_IMAGE}{EOI}", SOT, EOT,
                           {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE, "boa_token": BOA,
                            "eoa_token": EOA, "audio_token": AUDIO})


def _processor(hf_tok):
    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    allow_processors_without_torchvision()  # Gemma4Processor's module imports torchvision for two helpers
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor
    from transformers.utils import is_torchvision_available

    # both backends save image_processor_type "Gemma4ImageProcessor"; AutoProcessor picks the installed one
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        from transformers import Gemma4ImageProcessor as _IP
    else:
        from transformers import Gemma4ImageProcessorPil as _IP

    image_processor = _IP(patch_size=PATCH_SIZE, max_soft_tokens=MAX_SOFT_TOKENS,
                          pooling_kernel_size=POOLING_KERNEL_SIZE, do_convert_rgb=True)
    vision = dict(patch_size=PATCH_SIZE, max_soft_tokens=MAX_SOFT_TOKENS, pooling_kernel_size=POOLING_KERNEL_SIZE)
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        from transformers import Gemma4VideoProcessor

        video_processor = Gemma4VideoProcessor(**vision)
    else:  # Gemma4Processor requires one; images only here (the real class needs torchvision)
        from transformers.video_processing_utils import BaseVideoProcessor

        video_processor = BaseVideoProcessor(**vision)
    # the processor requires an audio feature extractor too (numpy only); the model has no audio tower
    feature_extractor = Gemma4AudioFeatureExtractor()
    return Gemma4Processor(feature_extractor=feature_extractor, image_processor=image_processor, tokenizer=hf_tok,
                           video_processor=video_processor, chat_template=CHAT_TEMPLATE,
                           image_seq_length=MM_TOKENS_PER_IMAGE)


def _config(hf_tok):
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    ids = {name: hf_tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vision = Gemma4VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        patch_size=PATCH_SIZE,
        pooling_kernel_size=POOLING_KERNEL_SIZE,
        position_embedding_size=POSITION_EMBEDDING_SIZE,
        initializer_range=VISION_INIT,
    )
    text = Gemma4TextConfig(
        vocab_size=len(hf_tok),
        vocab_size_per_layer_input=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=32,
        layer_types=list(LAYER_TYPES),
        sliding_window=SLIDING_WINDOW,
        hidden_size_per_layer_input=PER_LAYER_INPUT,
        num_kv_shared_layers=NUM_KV_SHARED_LAYERS,
        use_bidirectional_attention="vision",
        max_position_embeddings=4096,
        initializer_range=TEXT_INIT,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=ids[BOI],
        eoi_token_id=ids[EOI],
        image_token_id=ids[IMAGE],
        video_token_id=hf_tok.convert_tokens_to_ids(VIDEO),
        boa_token_id=ids[BOA],
        eoa_token_index=ids[EOA],
        audio_token_id=ids[AUDIO],
        initializer_range=TEXT_INIT,
        tie_word_embeddings=True,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids[BOS], ids[EOT], ids[PAD]
    return config


def build_gemma4(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Gemma 4 (processor + model) into `out_dir` (replaced atomically) and return it."""
    import torch
    from transformers import Gemma4ForConditionalGeneration, GenerationConfig

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        hf_tok = _tokenizer()
        processor = _processor(hf_tok)  # adds `<|video|>` to the tokenizer (its own FIXME)
        config = _config(hf_tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Gemma4ForConditionalGeneration(config).to(torch.float32)
            # the image side at HF's usual 0.02, its patch position table included (transformers starts it at ones)
            redraw_matrices(model.model.vision_tower)
            redraw_matrices(model.model.embed_vision)
            with torch.no_grad():
                for layer in model.model.vision_tower.encoder.layers:  # see the module docstring
                    layer.post_attention_layernorm.weight.fill_(VISION_INIT)
                    layer.post_feedforward_layernorm.weight.fill_(VISION_INIT)
                for layer in model.model.language_model.layers:
                    for norm in (layer.self_attn.q_norm, getattr(layer.self_attn, "k_norm", None)):
                        if norm is not None:  # a KV-shared layer has no k_norm (it reuses the keys)
                            norm.weight.fill_(QK_NORM_SCALE)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=[config.eos_token_id, hf_tok.convert_tokens_to_ids(EOS)],
            pad_token_id=config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(
            json.dumps({"kind": "tiny-gemma4", "seed": seed, "version": 1}, indent=2) + "\n"
        )
    return out_dir
