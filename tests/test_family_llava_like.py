"""LLaVA-like families on the shared-prefix path: LLaVA-OneVision (SigLIP + Qwen2, AnyRes), InternVL (InternViT +
Qwen2, dynamic tiles) and Mistral 3 (Pixtral + Mistral, native resolution), each as a tiny model built offline
with its own processor. Packed == plain on the sdpa and pairs backends (pair per row, padded rows, one row, with
and without gradient checkpointing, images of different sizes), the pairs layout reaches the text attention and
never the vision tower, and the encoder's prompt length is the processor's."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from equivalence import assert_equivalent, with_rejected
from vlm_orpo.assets import ensure_tiny_model
from vlm_orpo.data.packing import PackedCollator, PairEncoder
from vlm_orpo.images import open_image
from vlm_orpo.modeling import attention
from vlm_orpo.modeling.families import family_for, llava
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.shared_prefix import attention_backend, packed_logps, set_attention_backend

FAMILIES = ["llava_onevision", "internvl", "mistral3"]
BACKENDS = ["sdpa", "pairs"]  # flex has no CPU backward
LAYOUTS = {"pair-per-row": 4, "padded-rows": 2, "one-row": 1}  # rows for 4 pairs
# (height, width): other AnyRes grids / tile counts / patch grids than the data's 128x128, so other token counts
MIXED_SIZES = [(96, 160), (200, 100), (128, 128), (64, 64)]
QUESTION = "What colour is the shape?"

# what each family's chat template renders for QUESTION, and its processor's image tokens (besides image_token)
PROMPTS = {
    "llava_onevision": "<|im_start|>user <image>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n",
    "mistral3": "<s>[INST][IMG]What colour is the shape?[/INST]",
}
EOS = {"llava_onevision": "<|im_end|>", "internvl": "<|im_end|>", "mistral3": "</s>"}


def _rows(path: str, n: int) -> list[dict]:
    return pq.read_table(path).slice(0, n).to_pylist()


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, asset_cache):
    """One family's tiny model dir, processor, encoder, 8 encoded pairs of the bundled data (128x128), and 4 pairs
    whose images have other sizes (MIXED_SIZES)."""
    name = request.param
    path = ensure_tiny_model(name)
    processor = AutoProcessor.from_pretrained(path)
    encoder = PairEncoder(processor, max_answer_tokens=32)
    rows = _rows(asset_cache["train"], 8)
    pairs = [encoder.encode(row) for row in rows]
    mixed = [encoder.encode(dict(row, image=open_image(row["image"]).resize((w, h))))
             for row, (h, w) in zip(rows, MIXED_SIZES)]
    return SimpleNamespace(name=name, path=path, processor=processor, encoder=encoder, pairs=pairs, mixed=mixed,
                           pad_id=encoder.tokenizer.pad_token_id, image_id=encoder.image_token_id)


def red_square(size: tuple[int, int]) -> dict:
    from PIL import Image

    h, w = size
    return {"idx": 0, "image": Image.new("RGB", (w, h), (200, 30, 30)), "question": QUESTION, "chosen": "red",
            "rejected": "blue"}


def tiny(fam, backend="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(fam.path, dtype=torch.float32)
    set_attention_backend(model, backend)
    return model


def row_caps(pairs) -> dict:
    """max_tokens_per_row that packs 4 pairs into 4 rows, 2 rows, 1 row."""
    n = [len(p) for p in pairs]
    return {"pair-per-row": None, "padded-rows": max(n[0] + n[1], n[2] + n[3]), "one-row": sum(n)}


def check_rows(batch, layout):
    rows = batch["input_ids"].shape[0]
    assert rows == LAYOUTS[layout]
    if rows == 2:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


def test_family_entry_and_module_paths(fam):
    model = tiny(fam)
    family = family_for(model.config)
    assert family is getattr(llava, fam.name.upper())
    assert family.packed and set(family.backends) >= {"sdpa", "pairs"}
    modules = dict(model.named_modules())
    for path in (family.language_model, family.projector, family.vision_tower):
        assert path in modules, path
    assert modules[family.language_model] is model.model.language_model
    regex = lora_target_regex(model, family, "all-linear")
    targets = [n for n, m in modules.items() if re.match(regex, n)]
    assert targets and all(n.startswith(family.language_model + ".") for n in targets)


def test_chat_template_and_answer_ids(fam):
    enc = fam.encoder
    assert enc.prompt_text(QUESTION) == PROMPTS[fam.name]
    ids = enc.answer_ids(QUESTION, "It is red.")
    assert enc.tokenizer.decode(ids) == "It is red." + EOS[fam.name]
    assert ids[-1] == enc.tokenizer.eos_token_id and ids.count(enc.tokenizer.eos_token_id) == 1
    # the assistant part is marked for return_assistant_tokens_mask ({% generation %})
    chat = enc.messages(QUESTION) + [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    out = enc.tokenizer.apply_chat_template(chat, chat_template=fam.processor.chat_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert enc.tokenizer.decode(masked) == "It is red." + EOS[fam.name]


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (160, 96), (200, 100), (64, 64), (40, 300), (256, 256),
                                  (33, 77)])
def test_prompt_length_is_the_processors(fam, size):
    """PairEncoder.prompt_length (the processor's `_get_num_multimodal_tokens`) == the real expanded prompt."""
    pair = fam.encoder.encode(red_square(size))
    assert fam.encoder.prompt_length(QUESTION, size) == len(pair.prompt_ids)


def test_image_tokens_and_sizes(fam):
    """A 128x128 image's token count, and dynamic resolution: the mixed sizes give different counts."""
    tok = fam.encoder.tokenizer
    counts = [p.prompt_ids.count(fam.image_id) for p in fam.mixed]
    assert len(set(counts)) > 1
    ids = fam.encoder.encode(red_square((128, 128))).prompt_ids
    n = ids.count(fam.image_id)
    assert {"llava_onevision": 88, "internvl": 80, "mistral3": 64}[fam.name] == n
    if fam.name == "internvl":  # <img> 5 tiles x 16 <IMG_CONTEXT> </img>
        start = ids.index(tok.convert_tokens_to_ids("<img>"))
        assert ids[start + 1 + n] == tok.convert_tokens_to_ids("</img>")
    if fam.name == "mistral3":  # 8 rows of 8 [IMG], [IMG_BREAK] after each but the last, which gets [IMG_END]
        assert ids.count(tok.convert_tokens_to_ids("[IMG_BREAK]")) == 7
        assert ids.count(tok.convert_tokens_to_ids("[IMG_END]")) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_plain(fam, layout, backend):
    pairs = fam.pairs[:4]
    assert len({len(p) for p in pairs}) > 1, "the test needs pairs of different lengths"
    batch = assert_equivalent(tiny(fam, backend), pairs, fam.pad_id, fam.image_id, row_caps(pairs)[layout])
    check_rows(batch, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_rejected_per_prompt_equal_the_plain_forward(fam, backend):
    """[P, C, R1, R2, R3] groups, two a row: each answer sees only its prompt and itself."""
    groups = with_rejected(fam.pairs[:3], 3)
    batch = assert_equivalent(tiny(fam, backend), groups, fam.pad_id, fam.image_id, len(groups[0]) + len(groups[1]))
    assert batch["input_ids"].shape[0] == 2 and len(batch["meta"]) == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_plain_with_gradient_checkpointing(fam, backend):
    pairs = fam.pairs[4:8]
    batch = assert_equivalent(tiny(fam, backend), pairs, fam.pad_id, fam.image_id, row_caps(pairs)["padded-rows"],
                              gradient_checkpointing=True)
    check_rows(batch, "padded-rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_plain_with_images_of_different_sizes(fam, backend, layout="padded-rows"):
    """AnyRes grids (OneVision: its image tensors are padded to the most crops), tile counts (InternVL: tiles
    concatenated), native resolutions (Mistral 3: pixels padded to the largest, one vision sequence)."""
    batch = assert_equivalent(tiny(fam, backend), fam.mixed, fam.pad_id, fam.image_id, row_caps(fam.mixed)[layout])
    check_rows(batch, layout)


def test_pair_layout_reaches_the_text_attention_only(fam, monkeypatch):
    """With pairs, every text attention call gets the layout; the vision tower stays on SDPA and never sees it."""
    model = tiny(fam, "pairs")
    assert attention_backend(model) == "pairs"
    assert model.config.get_text_config()._attn_implementation == attention.IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"
    calls = []
    for impl in (attention.IMPLEMENTATION, "sdpa"):
        real = ALL_ATTENTION_FUNCTIONS[impl]

        def spy(module, *args, _real=real, _impl=impl, **kwargs):
            calls.append((_impl, type(module).__name__, kwargs.get("pair_layout") is not None))
            return _real(module, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, impl, spy)
    batch = PackedCollator(fam.pad_id, fam.image_id, max_tokens_per_row=10_000)(fam.pairs[:3])
    with torch.no_grad():
        packed_logps(model, batch)
    text = [c for c in calls if c[0] == attention.IMPLEMENTATION]
    vision = [c for c in calls if c[0] == "sdpa"]
    assert len(text) == model.config.get_text_config().num_hidden_layers and all(c[2] for c in text)
    assert vision and not any(c[2] for c in vision)
    assert not {c[1] for c in text} & {c[1] for c in vision}


def test_processor_loads_in_a_fresh_process(fam):
    """`load_processor` in a new process on the cached tiny model: without torchvision, transformers 5.17 loads
    these processors only after `modeling.processor_compat`, which `load_processor` applies first."""
    code = ("from vlm_orpo.config import ModelConfig\nfrom vlm_orpo.modeling.load import load_processor\n"
            f"print(type(load_processor(ModelConfig(name_or_path={fam.path!r}))).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == type(fam.processor).__name__
