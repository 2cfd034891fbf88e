"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE on the packed path: 3D M-RoPE positions equal the model's own,
with images of different sizes in one batch, several images and a video in one prompt, Qwen3-VL's deepstack
features, the MoE decoder's routing (training through the CLI: test_family_quickstart)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import vlm_orpo.modeling.families.qwen2_vl as qwen_family  # makes Qwen-VL processors load without torchvision
from equivalence import assert_equivalent, rel_err, with_rejected
from vlm_orpo.assets import tiny_qwen
from vlm_orpo.data.packing import EncodedPair, PackedCollator, PairEncoder, PlainCollator
from vlm_orpo.modeling.families import ModelFamily, family_for
from vlm_orpo.modeling.shared_prefix import packed_logps, set_attention_backend

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
BACKENDS = ["sdpa", "pairs"]
LAYOUTS = {  # id: (max_tokens_per_row, gradient_checkpointing, rows for the 4 pairs)
    "pair-per-row": (None, False, 4),
    "padded-rows-grad-ckpt": (160, True, 3),
    "one-row": (4000, False, 1),
}


class Tiny:
    """One family's tiny model directory, processor, encoder and encoded pairs of the bundled data."""

    def __init__(self, family, asset_cache):
        from transformers import AutoProcessor

        from vlm_orpo.assets import ensure_tiny_model
        from vlm_orpo.config import DataConfig
        from vlm_orpo.data.packing import load_pairs

        self.family = family
        self.path = ensure_tiny_model(family)
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.encoder = PairEncoder(self.processor, max_answer_tokens=32)
        self.train, _, _ = load_pairs(DataConfig(source=asset_cache["train"]), self.encoder)
        self.pairs = [self.train[i] for i in range(4)]
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.image_id = self.encoder.image_token_id

    def model(self, backend="sdpa"):
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=torch.float32)
        set_attention_backend(model, backend)
        return model

    def row(self, i: int, size: tuple[int, int]) -> dict:
        """Train row i with its image resized to `size` (width, height)."""
        row = dict(self.train.rows[i])
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize(size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        row["image"] = {"bytes": buffer.getvalue(), "path": None}
        return row


_TINY: dict[str, Tiny] = {}


@pytest.fixture(params=FAMILIES)
def tiny(request, asset_cache) -> Tiny:
    if request.param not in _TINY:  # built and encoded once per session
        _TINY[request.param] = Tiny(request.param, asset_cache)
    return _TINY[request.param]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_plain(tiny, backend, layout):
    max_tokens_per_row, gradient_checkpointing, rows = LAYOUTS[layout]
    assert len({len(p) for p in tiny.pairs}) > 1, "the test needs pairs of different lengths"
    batch = assert_equivalent(tiny.model(backend), tiny.pairs, tiny.pad_id, tiny.image_id, max_tokens_per_row,
                              gradient_checkpointing)
    assert batch["input_ids"].shape[0] == rows
    if rows > 1:
        assert (batch["span"] == -1).any(), "rows of unequal length must be padded"


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_rejected_per_prompt_equal_the_plain_forward(tiny, backend):
    """Every answer of a group [P, C, R1, R2, R3] continues the prompt's M-RoPE positions on all three axes."""
    groups = with_rejected(tiny.pairs[:3], 3)
    batch = assert_equivalent(tiny.model(backend), groups, tiny.pad_id, tiny.image_id, 4000)  # one row
    assert batch["input_ids"].shape[0] == 1 and len(batch["meta"]) == 9


def test_the_family_entry(tiny):
    model = tiny.model()
    family = family_for(model.config)
    assert family.name == tiny.family and type(family) is qwen_family.QwenVLFamily
    for path in (family.language_model, family.projector, family.vision_tower):
        model.get_submodule(path)
    assert type(model.get_submodule(family.language_model)).__name__.endswith("TextModel")


# --- dynamic resolution: images of different sizes, so different grids, in one batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_of_different_sizes_in_one_batch(tiny, backend):
    sizes = [(128, 128), (128, 64), (64, 96), (160, 96)]
    rows = [tiny.row(i, size) for i, size in enumerate(sizes)]
    pairs = [tiny.encoder.encode(row) for row in rows]
    grids = [tuple(p.image_inputs["image_grid_thw"][0].tolist()) for p in pairs]
    assert len(set(grids)) == len(sizes), grids
    for row, pair, (width, height) in zip(rows, pairs, sizes):  # the validation's count is the processor's
        assert tiny.encoder.prompt_length(row["question"], (height, width)) == len(pair.prompt_ids)
    assert_equivalent(tiny.model(backend), pairs, tiny.pad_id, tiny.image_id, 4000)  # one row, four grids


# --- several images and a video in one prompt, built with the processor


def video_inputs(family: str, processor, frames: int, height: int, width: int, seed: int):
    """A video of `frames` temporal patches on an (height x width)-patch grid: its placeholder text, as the
    family's processor expands it, and random patches as its video processor would give them (built by hand:
    transformers' Qwen video processors need torchvision)."""
    ip = processor.image_processor
    per_frame = height * width // ip.merge_size**2
    pad = processor.video_token
    if family.startswith("qwen3_vl"):  # Qwen3-VL: a timestamp before each frame, each in its own vision markers
        text = "".join(f"<{0.5 + 2 * t:.1f} seconds><|vision_start|>{pad * per_frame}<|vision_end|>"
                       for t in range(frames))
    else:
        text = pad * (frames * per_frame)
    gen = torch.Generator().manual_seed(seed)
    patch = 3 * ip.temporal_patch_size * ip.patch_size**2
    tensors = {
        "pixel_values_videos": torch.randn(frames * height * width, patch, generator=gen),
        "video_grid_thw": torch.tensor([[frames, height, width]]),
    }
    if family == "qwen2_5_vl":  # 2 s per temporal patch: frames are tokens_per_second * 2 = 4 positions apart
        tensors["second_per_grid_ts"] = torch.tensor([2.0])
    return text, tensors


def multimodal_pairs(tiny: Tiny, with_video: bool) -> list[EncodedPair]:
    """Three pairs, each prompt holding two images of different sizes (and then a video of 4 or 6 frames)."""
    processor, encoder = tiny.processor, tiny.encoder
    image_sizes = [((128, 128), (64, 96)), ((128, 64), (96, 96)), ((96, 160), (128, 128))]
    pairs = []
    for i, sizes in enumerate(image_sizes):
        row = tiny.train.rows[i]
        question = row["question"]
        content = [{"type": "image"}, {"type": "text", "text": "Look."}, {"type": "image"},
                   {"type": "text", "text": question}]
        if with_video:  # last, so that Qwen2.5-VL's frames reach past the text that follows (see below)
            content.append({"type": "video"})
        messages = [{"role": "user", "content": content}]
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text, tensors = rendered, {}
        if with_video:
            video_text, tensors = video_inputs(tiny.family, processor, frames=4 + 2 * (i % 2), height=8, width=12,
                                               seed=i)
            # the chat template's <|video_pad|>, expanded as the processor would
            text = text.replace(processor.video_token, video_text, 1)
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        inputs = processor(text=[text], images=[image.resize(size) for size in sizes], return_tensors="pt")
        prompt_ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask")
        token_inputs = {"mm_token_type_ids": inputs.pop("mm_token_type_ids")}
        chosen = encoder.answer_ids(messages, row["chosen"], rendered)
        rejected = encoder.answer_ids(messages, row["rejected"], rendered)
        pairs.append(EncodedPair(i, prompt_ids, chosen, rejected, {**inputs, **tensors}, token_inputs))
        assert inputs["image_grid_thw"].shape[0] == 2
        if with_video:
            assert (token_inputs["mm_token_type_ids"] == 2).sum() == tensors["video_grid_thw"].prod() // 4
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_video", [False, True], ids=["two-images", "two-images-and-video"])
def test_several_images_and_video_in_one_prompt(tiny, backend, with_video):
    pairs = multimodal_pairs(tiny, with_video)
    batch = assert_equivalent(tiny.model(backend), pairs, tiny.pad_id, tiny.image_id, 4000)  # one row
    assert batch["images"]["image_grid_thw"].shape[0] == 2 * len(pairs)


def plain_rope(model, pairs, pad_id):
    """The model's own 3D positions of the plain batch ([prompt + chosen] rows, then [prompt + rejected] rows)."""
    batch = PlainCollator(pad_id, -1)(pairs)
    grids = {k: v for k, v in batch["images"].items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    rope, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                         attention_mask=batch["attention_mask"], **grids)
    return rope


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "images-and-video"])
def test_positions_are_the_models_own(tiny, with_video):
    """Per token, the packed positions are exactly those the model gives [prompt, chosen] and [prompt, rejected]:
    rejected restarts where chosen starts, on all three axes."""
    model = tiny.model()
    pairs = multimodal_pairs(tiny, with_video) if with_video else tiny.pairs
    batch = PackedCollator(tiny.pad_id, tiny.image_id, max_tokens_per_row=4000)(pairs)
    packed = family_for(model.config).position_ids(model, batch)
    assert packed.shape == (3, *batch["input_ids"].shape)
    plain = plain_rope(model, pairs, tiny.pad_id)
    n = len(pairs)
    for i, pair in enumerate(pairs):
        P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        mine = packed[:, batch["pair_index"] == i]
        assert torch.equal(mine[:, : P + C], plain[:, i, : P + C])
        assert torch.equal(mine[:, P + C :], plain[:, n + i, P : P + R])
        if with_video and tiny.family == "qwen2_5_vl":
            # the video's frames are 4 positions apart, so its last frame sits past the text after it: the answer
            # continues from that text, not from the prompt's largest position + 1
            assert mine[:, P].unique().item() < mine[:, :P].max() + 1


def test_one_dimensional_positions_are_not_the_plain_forward(tiny):
    """The equivalence test sees positions: with the 1D restarted positions, packed differs from plain."""
    from vlm_orpo.modeling.plain import plain_pair_logps

    model = tiny.model()
    batch = PackedCollator(tiny.pad_id, tiny.image_id, max_tokens_per_row=4000)(tiny.pairs)
    with torch.no_grad():
        plain = plain_pair_logps(model, tiny.pairs, tiny.pad_id)
        right = packed_logps(model, batch)
        original = qwen_family.QwenVLFamily.position_ids
        qwen_family.QwenVLFamily.position_ids = ModelFamily.position_ids
        try:
            wrong = packed_logps(model, batch)
        finally:
            qwen_family.QwenVLFamily.position_ids = original
    assert rel_err(right.chosen, plain.chosen) <= 1e-5
    assert rel_err(wrong.chosen, plain.chosen) > 1e-3


def packed_forward_with_hook(tiny: Tiny, model, hook) -> dict:
    """One packed forward of the tiny pairs in one row, `hook` (already registered on `model`) removed after it;
    the batch."""
    batch = PackedCollator(tiny.pad_id, tiny.image_id, max_tokens_per_row=4000)(tiny.pairs)
    try:
        with torch.no_grad():
            packed_logps(model, batch)
    finally:
        hook.remove()
    return batch


def test_qwen3_deepstack_features_reach_the_image_tokens(asset_cache):
    """Qwen3-VL adds its deepstack features to the image tokens' hidden states after the first decoder layers; in
    the packed row they must land on each pair's own image tokens (the equivalence tests prove the values; this
    proves the path is taken)."""
    tiny = _TINY.get("qwen3_vl") or Tiny("qwen3_vl", asset_cache)
    model = tiny.model()
    assert model.config.vision_config.deepstack_visual_indexes
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("visual_pos_masks")), with_kwargs=True)
    batch = packed_forward_with_hook(tiny, model, hook)
    assert torch.equal(seen[0], batch["input_ids"] == tiny.image_id)


def test_qwen3_moe_routes_each_token_to_its_experts(asset_cache):
    """The tiny Qwen3-VL-MoE's sparse layer is a real mixture: the packed forward's tokens go to every expert, two
    each (the equivalence tests prove that a packed row routes every token as its own sequence does)."""
    tiny = _TINY.get("qwen3_vl_moe") or Tiny("qwen3_vl_moe", asset_cache)
    model = tiny.model()
    text = model.config.text_config
    assert 1 < text.num_experts_per_tok < text.num_experts
    routed = []
    sparse = [layer.mlp for layer in model.model.language_model.layers if hasattr(layer.mlp, "experts")]
    assert len(sparse) == 1  # the first layer is dense (tiny_qwen: LoRA adapts its MLP)
    hook = sparse[0].gate.register_forward_hook(lambda module, args, output: routed.append(output[2]))
    batch = packed_forward_with_hook(tiny, model, hook)
    experts = routed[0]
    assert experts.shape == (batch["input_ids"].numel(), text.num_experts_per_tok)
    assert set(experts.unique().tolist()) == set(range(text.num_experts))


# --- the tiny models and their processors


def test_tiny_model_and_processor(tiny):
    tokenizer = tiny.processor.tokenizer
    assert type(tiny.processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                             "qwen3_vl": "Qwen3VLProcessor",
                                             "qwen3_vl_moe": "Qwen3VLProcessor"}[tiny.family]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    prompt = tiny.encoder.prompt_text("What colour is the shape?")
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    pair = tiny.pairs[0]
    t, h, w = pair.image_inputs["image_grid_thw"][0].tolist()
    assert pair.prompt_ids.count(tiny.image_id) == t * h * w // 4  # one token per 2x2 merged patches
    assert h * w * 8 * 8 <= tiny_qwen.MAX_PIXELS  # resized to at most MAX_PIXELS pixels: patches of 8 pixels
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen_ids) == tiny.train.rows[0]["chosen"] + "<|im_end|>"
    # an answer that says a control token's text keeps it as text
    ids = tiny.encoder.answer_ids("Q?", "I see <|image_pad|> and <|im_end|> here")
    assert tiny.image_id not in ids and ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tiny.model().num_parameters() < 750_000


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_deterministic(tmp_path, family):
    from vlm_orpo.assets.tiny_qwen import build

    a, b = build(family, tmp_path / "a", seed=0), build(family, tmp_path / "b", seed=0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").stat().st_size < 3_000_000


def test_no_flex_backend_on_cuda():
    """transformers' Qwen-VL text models refuse flex_attention: `auto` on CUDA resolves to pairs, and an explicit
    flex is the family's one-line error, not transformers' deep one."""
    from vlm_orpo.modeling.shared_prefix import resolve_backend

    for family in FAMILIES:
        backends = family_for(type("C", (), {"model_type": family})()).backends
        assert resolve_backend("auto", torch.device("cuda"), backends) == "pairs"
        with pytest.raises(ValueError, match="does not support this model family"):
            resolve_backend("flex", torch.device("cuda"), backends)
