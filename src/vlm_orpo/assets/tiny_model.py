"""A tiny, randomly initialised LLaVA-NeXT (CLIP vision tower + Mistral text model).

Built offline and deterministically from a seed: a byte-level BPE tokenizer trained on a
fixed corpus (the synthetic data's vocabulary plus ordinary English), a
`LlavaNextProcessor` with a LLaVA-v1.6-Mistral style chat template, and a
`LlavaNextForConditionalGeneration` with about 0.7M parameters (~2.7 MB float32).

A 128x128 image becomes a 2x2 "anyres" grid of 64x64 crops: 64 base tokens +
16x16 unpadded grid tokens + 16 newline tokens = 336 image tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_orpo.assets.atomic import atomic_dir

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_GRID_PINPOINTS",
    "TEXT_INIT",
    "VISION_INIT",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "build_tiny_model",
    "build_tokenizer",
    "redraw_matrices",
    "train_bpe",
    "wrap_tokenizer",
    "tokenizer_corpus",
]

VOCAB_SIZE = 1000
# std of every tiny text model's weights (`initializer_range`): HF's default 0.02 is tuned for hidden sizes in the
# thousands; at 128 it caps a frozen random lm_head's logits near +-2.5, so the quickstart could not become confident
# in minutes.
TEXT_INIT = 0.1
# std of the image side (vision towers, projectors): HF's usual 0.02. A tower or projector at the text model's 0.1, or
# SigLIP's own xavier/lecun init (~0.1 at width 64), mixes a random tower's tokens so much that a small shape's colour
# hardly survives, and the quickstart learnt its colour questions too slowly (issue 12).
VISION_INIT = 0.02
IMAGE_SIZE = 64  # vision tower input (crop) size
PATCH_SIZE = 8
IMAGE_GRID_PINPOINTS = [[64, 128], [128, 64], [128, 128]]

UNK, BOS, EOS, PAD, IMAGE, INST, INST_END = "<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE, INST, INST_END]  # ids 0..6 in this order

# LLaVA-v1.6-Mistral style (llava-hf/llava-v1.6-mistral-7b-hf):
#   user:      "[INST] <image>\nQUESTION [/INST]"
#   assistant: " ANSWER</s>"
# Differences from the hub template: content may also be a plain string, a system message is
# folded into the first user turn (Mistral style), there is no trailing space after "</s>",
# and the assistant text is wrapped in {% generation %} so that
# `return_assistant_tokens_mask=True` works. `add_generation_prompt` adds nothing: the
# assistant reply starts right after " [/INST]".
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- elif message['content'] is none -%}"
    "{%- set parts = [] -%}"
    "{%- else -%}"
    "{%- set parts = message['content'] -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') -%}"
    "{%- set ns.system = ns.system + part['text'] -%}"
    "{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' -}}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') -%}"
    "{{- '<image>\\n' -}}"
    "{%- endfor -%}"
    "{%- if ns.system -%}"
    "{{- ns.system + '\\n\\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') -%}"
    "{{- part['text'] -}}"
    "{%- endfor -%}"
    "{{- ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' -}}"
    "{%- generation -%}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') -%}"
    "{{- part['text'] -}}"
    "{%- endfor -%}"
    "{{- '</s>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Ordinary English so that arbitrary user text tokenizes into sensible pieces.
_ENGLISH_FILLER = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Please look at the image and answer the question. Can you tell me what you see?
There is a small house next to a tall tree, and a river runs behind the garden.
The weather today is sunny with a light wind from the west; tomorrow it may rain.
She opened the window, looked outside and counted the birds sitting on the wire.
He said that the answer was correct, but I think it was wrong because of the colour.
We have three apples, two bananas and one orange on the table in the kitchen.
This is a simple test. That is another one. These are examples; those are not.
What is the name of the person in the photo? Where was it taken? When and why?
How many people are standing near the car? Which one is the biggest? Who is it?
The model should describe the scene briefly, without inventing objects that are absent.
If the object is not visible, say that you cannot see it instead of guessing.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000. Letters: a b c d e f g h i j k l m n o p q r s t u v w x y z.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ + = * & % $ # @ < > | ~ ^ `.
Training a language model takes data, time and patience. Good data matters most.
Every morning the children walk to school along the road by the old stone bridge.
The cat sat on the mat while the dog slept under the chair near the warm fire.
Red, green, blue, yellow, purple, orange, white, black, gray, grey, pink and brown are colours.
Circles, squares, triangles, rectangles, stars, lines and dots are shapes.
The left side is bright and the right side is dark; the top is empty and the bottom is full.
I would like to know more about this. Could you explain it again, step by step, please?
Yes. No. Maybe. Thank you very much! You are welcome. Good night and see you soon.
It was the best of times, it was the worst of times, it was the age of wisdom.
Some things are large and some things are small, but all of them have a place.
The image shows an object in the centre, surrounded by a plain background.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
My family lives in a quiet village where the mountains meet the sea and the air smells of salt.
Scientists measure temperature, pressure and speed with careful instruments in the laboratory.
The teacher asked the students to write a short story about their favourite animal or place.
Our company builds software for hospitals, schools, banks and small businesses around the world.
After dinner we played music, read books, talked about history and watched the stars appear.
Water boils at one hundred degrees, and ice melts when the sun warms the frozen ground.
The government announced new rules for travel, trade, energy and the protection of forests.
Computers process information quickly, but people still decide what questions are worth asking.
Remember to bring your passport, ticket, phone, charger, umbrella and a bottle of water.
A healthy breakfast might include bread, eggs, cheese, fruit, milk, coffee or fresh juice.
The doctor listened carefully, checked the results and suggested a different treatment plan.
Football, tennis, swimming and running are popular sports in many countries and cities.
During the summer holiday they visited museums, beaches, markets, castles and famous gardens.
"""


def tokenizer_corpus() -> list[str]:
    """Deterministic tokenizer training corpus: synthetic-data text plus English filler."""
    from vlm_orpo.assets.synthetic import text_corpus

    lines = text_corpus()
    lines += [line for line in _ENGLISH_FILLER.splitlines() if line.strip()]
    return lines


def train_bpe(special_tokens: list[str], chat_lines: list[str] = ()):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `tokenizer_corpus()` plus `chat_lines` (chat-formatted
    samples, so the pieces around a family's special tokens are learned), with `special_tokens` as ids 0..n-1.
    Deterministic; every family's tiny model builds its tokenizer with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus() + list(chat_lines), trainer=trainer)
    for i, t in enumerate(special_tokens):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def redraw_matrices(module, std: float = VISION_INIT) -> None:
    """Draw every matrix of `module` (a vision tower or projector) again from N(0, std); biases and norms stay."""
    import torch

    with torch.no_grad():
        for weight in module.parameters():
            if weight.ndim >= 2:
                weight.normal_(std=std)


def build_tokenizer():
    """The LLaVA-NeXT tokenizer (`tokenizers.Tokenizer`): BOS prepended like Mistral/Llama; deterministic."""
    from tokenizers import processors

    lines = tokenizer_corpus()
    chat = [f"{INST} {IMAGE}\n{q} {INST_END} {a}{EOS}" for q, a in zip(lines[:40], lines[40:80])]
    tok = train_bpe(SPECIAL_TOKENS, chat)
    bos_id = tok.token_to_id(BOS)
    # Like Mistral/Llama: prepend <s> to every encoded sequence (add_special_tokens=True).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def wrap_tokenizer(tok, chat_template: str, **special):
    """A trained `tokenizers` BPE as the transformers tokenizer every tiny model saves: right padding, the family's
    special tokens (`bos_token=...`, `extra_special_tokens={...}`) and chat template."""
    from transformers import PreTrainedTokenizerFast  # alias of TokenizersBackend in transformers 5

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        truncation_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **special,
    )
    hf_tok.chat_template = chat_template
    return hf_tok


def _build_processor(hf_tok):
    from transformers import LlavaNextProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from transformers.utils import is_torchvision_available

    # transformers 5 has two backends; both save image_processor_type "LlavaNextImageProcessor",
    # so AutoProcessor picks whichever backend is installed when loading.
    if is_torchvision_available():  # pragma: no cover - depends on installed extras
        from transformers import LlavaNextImageProcessor as _IP
    else:
        from transformers import LlavaNextImageProcessorPil as _IP

    image_processor = _IP(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's CLS token (dropped again by "default")
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(hf_tok):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        projection_dim=64,
        num_channels=3,
    )
    text = MistralConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=4096,
        sliding_window=None,
        initializer_range=TEXT_INIT,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=hf_tok.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.bos_token_id = hf_tok.bos_token_id
    config.eos_token_id = hf_tok.eos_token_id
    config.pad_token_id = hf_tok.pad_token_id
    return config


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny LLaVA-NeXT (processor + model) into `out_dir` and return it.

    The directory is assembled next to `out_dir` and renamed into place, so an
    interrupted build never leaves a partial directory. An existing `out_dir` is replaced.
    """
    import torch
    from transformers import GenerationConfig, LlavaNextForConditionalGeneration

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        hf_tok = wrap_tokenizer(build_tokenizer(), CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                unk_token=UNK, extra_special_tokens={"image_token": IMAGE})
        processor = _build_processor(hf_tok)
        config = _build_config(hf_tok)

        # Seeded init on the CPU generator; fork_rng leaves the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaNextForConditionalGeneration(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
            pad_token_id=hf_tok.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlm_orpo_asset.json").write_text(
            json.dumps({"kind": "tiny-llava-next", "seed": seed, "version": 1}, indent=2) + "\n"
        )
    return out_dir
