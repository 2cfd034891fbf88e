#!/usr/bin/env python
"""Training-step benchmark: the plain two-sequence ORPO forward against the packed shared-prefix one.

One process, one model, the same pairs for every variant:

  plain          two sequences per pair ([prompt+chosen], [prompt+rejected]), the image in each, full logits
                 (what TRL's ORPOTrainer does; `modeling.reference.plain_logps`)
  packed_sdpa    one row [prompt, chosen, rejected] per pair, dense bool mask (`shared_prefix.dense_mask`)
  packed_flex    the same row with a FlexAttention BlockMask (`shared_prefix.block_mask`)
  <variant>_xN   N pairs per step: plain batches 2N sequences; packed puts all N pairs in one row

A step is forward + backward of the mean ORPO loss over the step's pairs, LoRA r=16 on every linear layer of
the language model (random A and B, so every gradient is real); there is no optimizer step (a LoRA AdamW
step is well under 1% of a step, and leaving the weights alone keeps every step's loss identical).
Timing: `--warmup` untimed steps, then the median of `--steps` (default 10) steps, each bracketed by
`torch.cuda.synchronize()` on CUDA. The losses of all variants must agree (fp32: 1e-4 relative; bf16/fp16:
1e-2); the script exits with status 2 if they do not, and 3 if a variant failed (out of memory is recorded
as a skip, not a failure). The --json file is rewritten after every variant, so a run cut short keeps what
it measured ("complete": false).

Sizes (random weights, built from a config, nothing downloaded):
  7b       llava-v1.6-mistral-7b architecture: Mistral-7B text model, CLIP ViT-L/14-336, anyres grid; a 640x480
           image gives 2340 image tokens; ~40-token question; answers lognormal around 150 tokens
  small    the same structure scaled down so the whole benchmark runs in well under 2 minutes on 2 CPU cores
  7b-tiny  the 7b input geometry (2340 image tokens, same answer lengths) with tiny widths, to check the 7b
           path on a CPU

    python benchmarks/step_bench.py --size small --device cpu --json out.json
    python benchmarks/step_bench.py --size 7b --device cuda --pairs-per-step 1 --compile --json out.json
    python benchmarks/step_bench.py --summarize benchmarks/results/*.json      # markdown table of results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make CPU timings erratic on a shared machine; must be set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
try:
    import vlm_orpo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlm_orpo.data.packing import EncodedPair, PackedCollator  # noqa: E402
from vlm_orpo.config import LossConfig  # noqa: E402
from vlm_orpo.losses import pair_losses  # noqa: E402
from vlm_orpo.modeling.families import family_for  # noqa: E402
from vlm_orpo.modeling.load import lora_target_regex  # noqa: E402
from vlm_orpo.modeling.reference import plain_batch  # noqa: E402
from vlm_orpo.modeling.shared_prefix import packed_logps, set_attention_backend, token_logps, unwrap  # noqa: E402

BASE_VARIANTS = ("plain", "packed_sdpa", "packed_flex")
LOSS = LossConfig(type="orpo", orpo_lambda=0.1)
LORA_R = 16  # alpha = 2r
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30

# Dense (no sparsity) tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_FLOPS = {
    torch.bfloat16: [
        ("H200", 989e12),
        ("H100 PCIe", 756e12),
        ("H100 NVL", 835e12),
        ("H100", 989e12),  # SXM
        ("H800", 989e12),
        ("GH200", 989e12),
        ("A100", 312e12),
        ("A800", 312e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("A10G", 70e12),
        ("A10", 125e12),
    ],
}
PEAK_FLOPS[torch.float16] = PEAK_FLOPS[torch.bfloat16]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------------------------------------------
# Model geometry


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


def make_pairs(model, size: Size, n: int, seed: int) -> list[EncodedPair]:
    """`n` pairs, each with its own random-pixel image of `size.image_hw` and random token ids.

    Prompt: BOS, a few [INST] tokens, the image tokens, the rest of the question; answers (lognormal lengths,
    chosen and rejected drawn independently) end in EOS. Pair i depends only on (seed, i).
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
            )
        )
    return pairs


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


# --------------------------------------------------------------------------------------------------------------
# FLOPs by formula (executed model FLOPs; no recomputation from gradient checkpointing)


def _text_dims(size: Size):
    t = size.text
    d, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    dh = t.get("head_dim") or d // heads
    return d, heads, kv, dh, t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]


def text_linears(size: Size) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer: q, k, v, o, gate, up, down."""
    d, heads, kv, dh, ffn, _, _ = _text_dims(size)
    return [(d, heads * dh), (d, kv * dh), (d, kv * dh), (heads * dh, d), (d, ffn), (d, ffn), (ffn, d)]


def vision_forward_flops(size: Size, crops: int) -> float:
    """CLIP tower (all layers run, feature layer -2 is read out) + projector, forward only (frozen)."""
    v, t = size.vision, size.text
    p = v["image_size"] // v["patch_size"]
    n = p * p + 1  # + CLS
    dv, fv = v["hidden_size"], v["intermediate_size"]
    patch_embed = 2 * p * p * (3 * v["patch_size"] ** 2) * dv
    per_layer = 2 * n * (4 * dv * dv + 2 * dv * fv) + 4 * n * n * dv
    projector = 2 * (n - 1) * (dv * t["hidden_size"] + t["hidden_size"] * t["hidden_size"])
    return crops * (patch_embed + v["num_hidden_layers"] * per_layer + projector)


def step_flops(size: Size, tokens: int, attended_pairs: int, logit_rows: int, crops: int, r: int) -> dict:
    """FLOPs of one training step, by component.

    Frozen base matmuls: forward + input-gradient = 2x forward (no weight gradient). LoRA (A and B trained):
    3x forward. Attention scores/values: 4 * attended (query, key) pairs * heads * head_dim forward, 3x for
    training; `attended_pairs` counts only the pairs the mask allows (causal, and rejected never sees chosen),
    so no variant is credited for masked-out work. LM head: 2x forward on the rows whose logits are computed
    (all tokens for plain, only answer-predicting positions for packed). Vision tower + projector: forward only.
    Elementwise ops (norms, rope, SiLU, softmax, log-softmax) are not counted.
    """
    d, heads, _, dh, _, layers, vocab = _text_dims(size)
    linears = text_linears(size)
    base = 2 * tokens * sum(i * o for i, o in linears) * layers
    lora = 2 * tokens * sum(r * (i + o) for i, o in linears) * layers
    attention = 4 * attended_pairs * heads * dh * layers
    lm_head = 2 * logit_rows * d * vocab
    vision = vision_forward_flops(size, crops)
    parts = {
        "linear": 2 * base,
        "lora": 3 * lora,
        "attention": 3 * attention,
        "lm_head": 2 * lm_head,
        "vision": vision,
    }
    parts["total"] = sum(parts.values())
    return parts


def crops_per_image(size: Size, image_inputs: dict) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(
        image_inputs["image_sizes"][0].tolist(), size.pinpoints, size.vision["image_size"]
    )


def plain_work(pairs: list[EncodedPair]) -> dict:
    seqs = [len(p.prompt_ids) + len(a) for p in pairs for a in (p.chosen_ids, p.rejected_ids)]
    return {
        "tokens": sum(seqs),
        "attended_pairs": sum(n * (n + 1) // 2 for n in seqs),
        "logit_rows": sum(seqs),
        "images": 2 * len(pairs),
    }


def packed_work(pairs: list[EncodedPair], batch: dict) -> dict:
    attended = 0
    for p in pairs:
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        attended += (P + C) * (P + C + 1) // 2 + R * P + R * (R + 1) // 2
    return {
        "tokens": sum(len(p) for p in pairs),
        "attended_pairs": attended,
        "logit_rows": int(batch["logits_to_keep"].numel()) * int(batch["input_ids"].shape[0]),
        "images": len(pairs),
    }


# --------------------------------------------------------------------------------------------------------------
# Steps


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        elif isinstance(v, dict):  # the packed batch nests its image tensors under "images"
            v = to_device(v, device, dtype)
        out[k] = v
    return out


def plain_targets(batch: dict, spans: list[tuple[int, int]]) -> dict:
    """Flat (sequence, predicting position, target id) of every answer token of a `plain_batch`."""
    rows, cols = [], []
    for i, (P, A) in enumerate(spans):
        rows += [i] * A
        cols += range(P - 1, P + A - 1)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    return {"rows": rows, "cols": cols, "ids": batch["input_ids"][rows, cols + 1],
            "lengths": torch.tensor([a for _, a in spans], dtype=torch.float32)}


def plain_step_logps(model, batch: dict, targets: dict):
    """The plain forward as TRL runs it: full-sequence logits for both sequences of every pair (LM head on every
    position), then every answer token's log-prob gathered in one go. Same values as
    `modeling.reference.plain_logps` (checked every run), whose per-sequence slices of the full logits cost one
    full-logits-sized gradient buffer per sequence in backward, which no real trainer pays."""
    from vlm_orpo.losses import PairLogps

    logits = model(**batch, use_cache=False).logits  # [2N, width, vocab]
    logps = token_logps(logits[targets["rows"], targets["cols"]], targets["ids"])
    n_seq = targets["lengths"].numel()
    sums = torch.zeros(n_seq, dtype=logps.dtype, device=logps.device).index_add(0, targets["rows"], logps)
    sums, lengths = sums.view(2, -1), targets["lengths"].to(logps.device, logps.dtype).view(2, -1)
    return PairLogps(chosen_sum=sums[0], rejected_sum=sums[1], chosen_tokens=lengths[0], rejected_tokens=lengths[1])


def reference_values(model, pairs: list[EncodedPair], pad_id: int):
    """Forward-only loss and log-probs from `modeling.reference.plain_logps` itself, for the loss check."""
    from vlm_orpo.modeling.reference import plain_logps

    with torch.no_grad():
        logps = plain_logps(model, pairs, pad_id)
        loss = pair_losses(logps, LOSS)["loss"].mean()
    return loss.float().item(), logps.chosen.float().cpu(), logps.rejected.float().cpu()


@dataclass
class Variant:
    name: str
    base: str  # plain | packed_sdpa | packed_flex
    n_pairs: int
    compute: object = None  # () -> PairLogps
    work: dict = field(default_factory=dict)
    backend: str = "sdpa"


def prepare_variant(model, base: str, pairs: list[EncodedPair], device, dtype, pad_id: int, image_id: int) -> Variant:
    n = len(pairs)
    name = base if n == 1 else f"{base}_x{n}"
    if base == "plain":
        batch, spans = plain_batch(pairs, pad_id)
        targets = to_device(plain_targets(batch, spans), device, torch.float32)
        batch = to_device(batch, device, dtype)
        return Variant(name, base, n, lambda: plain_step_logps(model, batch, targets), plain_work(pairs), "sdpa")
    backend = "flex" if base == "packed_flex" else "sdpa"
    collator = PackedCollator(pad_id, image_id, max_tokens_per_row=sum(len(p) for p in pairs))
    batch = collator(pairs)
    assert batch["input_ids"].shape[0] == 1, "all pairs of a step must share one row"
    work = packed_work(pairs, batch)
    batch = to_device(batch, device, dtype)
    return Variant(name, base, n, lambda: packed_logps(model, batch), work, backend)  # the model holds the backend


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, variant: Variant):
    model.zero_grad(set_to_none=True)
    logps = variant.compute()
    loss = pair_losses(logps, LOSS)["loss"].mean()
    loss.backward()
    return loss.detach(), logps


def time_variant(model, variant: Variant, device, warmup: int, steps: int):
    """(step times in s, loss, per-pair chosen/rejected mean log-probs)."""
    loss, logps = train_step(model, variant)  # first step: compile/autotune, and the values we compare
    values = (loss.float().item(), logps.chosen.detach().float().cpu(), logps.rejected.detach().float().cpu())
    for _ in range(max(warmup - 1, 0)):
        train_step(model, variant)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, variant)
        sync(device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times, values


def forward_only_values(model, variant: Variant):
    with torch.no_grad():
        logps = variant.compute()
        loss = pair_losses(logps, LOSS)["loss"].mean()
    return loss.float().item(), logps.chosen.float().cpu(), logps.rejected.float().cpu()


# --------------------------------------------------------------------------------------------------------------
# Profiling: time per model part, forward and backward


PROFILE_PARTS = {
    "model": "embed, image-feature merge, rotary tables, glue",
    None: "outside the model: mask build, log-probs, loss",
    "vision_tower": "vision tower",
    "projector": "projector",
    "attn_proj": "attention q/k/v/o (frozen base)",
    "attention": "attention core + rope + reshapes",
    "mlp": "MLP gate/up/down (frozen base) + SiLU*up",
    "lora": "LoRA A/B + scale/add",
    "norm": "RMSNorm",
    "lm_head": "LM head",
}


def _module_labels(model) -> dict:
    """module -> part label; the innermost labelled module wins for the ops it runs."""
    hf = unwrap(model)
    family = family_for(hf.config)
    labels = {hf: "model"}
    for name, module in hf.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name:
            continue
        if name == family.vision_tower:
            labels[module] = "vision_tower"
        elif name == family.projector:
            labels[module] = "projector"
        elif name == "lm_head" or name.endswith(".lm_head"):
            labels[module] = "lm_head"
        elif not name.startswith(family.language_model + "."):
            continue
        elif leaf == "self_attn":
            labels[module] = "attention"
        elif leaf == "mlp":
            labels[module] = "mlp"
        elif leaf.endswith("norm") or leaf.endswith("layernorm"):
            labels[module] = "norm"
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            labels[module] = "lora"
        elif leaf == "base_layer":
            parent = name.rsplit(".", 2)[-2]
            labels[module] = "mlp" if parent in ("gate_proj", "up_proj", "down_proj") else "attn_proj"
        elif isinstance(module, torch.nn.Linear) and leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            labels[module] = "attn_proj"  # no LoRA on it
    return labels


class PartLabels:
    """Forward hooks that open a `bench::<part>` profiler range around each labelled module."""

    def __init__(self, model):
        self.handles = []
        self.stack = []
        for module, label in _module_labels(model).items():
            self.handles.append(module.register_forward_pre_hook(self._enter(label)))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, label):
        def hook(module, args):
            rf = torch.profiler.record_function(f"bench::{label}")
            rf.__enter__()
            self.stack.append(rf)

        return hook

    def _exit(self, module, args, output):
        if self.stack:
            self.stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_convolution",
               "aten::convolution", "aten::cudnn_convolution", "aten::mkldnn_convolution", "aten::_scaled_mm")
_ATTN_OPS = ("scaled_dot_product", "flash", "efficient_attention", "flex_attention", "FlexAttention", "triton_tem")
_COPY_OPS = ("aten::copy_", "aten::cat", "aten::index", "aten::gather", "aten::scatter", "aten::masked_scatter",
             "aten::index_select", "aten::index_add", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous",
             "aten::embedding", "Memcpy", "Memset", "aten::_to_copy", "aten::where", "aten::repeat")


def op_kind(name: str) -> str:
    if any(name.startswith(p) for p in _MATMUL_OPS):
        return "matmul"
    if any(p in name for p in _ATTN_OPS):
        return "attention kernel"
    if any(name.startswith(p) for p in _COPY_OPS):
        return "copy/index/fill"
    if name.startswith(("aten::", "triton_")):
        return "elementwise/reduction"
    return "other"


def kernel_kind(name: str) -> str:
    """Kind of a GPU kernel from its name (cuBLAS/CUTLASS GEMMs, attention kernels, Triton fusions, ...)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "flex")):
        return "attention kernel"
    if any(k in n for k in ("gemm", "cutlass", "cublas", "xmma", "matmul", "splitk", "nvjet")):
        return "matmul"
    if "triton_tem" in n:
        return "triton template (mm or flex)"
    if any(k in n for k in ("memcpy", "memset", "copy", "fill", "index", "gather", "scatter", "cat_", "catarray")):
        return "copy/index/fill"
    if n.startswith("triton_"):
        return "fused elementwise/reduction (triton)"
    return "elementwise/reduction"


def profile_breakdown(model, variant: Variant, device, steps: int = 2, module_labels: bool = True) -> dict:
    """Time of `steps` training steps (CUDA: kernel time, each kernel charged to the op that launched it; CPU: op
    self time), grouped two ways:
    by model part (forward, and backward attributed to the forward op that made each autograd node), and by
    op kind (matmul / attention kernel / elementwise / copy). Returns a dict plus the profiler's own table.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = PartLabels(model) if module_labels else None
    try:
        train_step(model, variant)  # hooks in place before profiling (first hooked call may be slower)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                train_step(model, variant)
            sync(device)
    finally:
        if labels is not None:
            labels.remove()
        model.zero_grad(set_to_none=True)

    try:
        table = prof.key_averages().table(
            sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=25
        )
    except Exception as exc:  # noqa: BLE001 - the table is a convenience
        table = f"(profiler table unavailable: {exc})"
    out = aggregate_profile(list(prof.events()), device.type == "cuda", steps, module_labels)
    out["table"] = table
    return out


def aggregate_profile(events: list, cuda: bool, steps: int, module_labels: bool = True) -> dict:
    """Group profiler `FunctionEvent`s by model part and by op kind (see `profile_breakdown`)."""
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]

    def innermost_label(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("bench::"):
                return p.name[len("bench::"):]
            p = p.cpu_parent
        return None

    def own_label(e):
        return e.name[len("bench::"):] if e.name.startswith("bench::") else innermost_label(e)

    # forward autograd-node sequence numbers -> part label, keyed by (forward thread, sequence_nr)
    seq_label = {}
    for e in cpu_events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            seq_label.setdefault((e.thread, e.sequence_nr), own_label(e))

    def backward_root(e):
        p = e
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function:"):
                return p
            p = p.cpu_parent
        return None

    def part_of(e) -> str:
        if e is None:
            return "GPU kernels with no CPU op"
        root = backward_root(e)
        if root is None:
            return f"{PROFILE_PARTS.get(own_label(e), own_label(e))} [fwd]"
        if "AccumulateGrad" in root.name:
            return "grad accumulation (LoRA .grad)"
        label = seq_label.get((root.fwd_thread, root.sequence_nr))
        return f"{PROFILE_PARTS.get(label, label)} [bwd]"

    # (microseconds, owning CPU op or None, kind): kernel time on CUDA, op self time on CPU
    items = []
    if cuda:
        for e in cpu_events:
            for k in e.kernels:
                items.append((k.duration, e, kernel_kind(k.name)))
        ids = {e.id for e in cpu_events if e.kernels}
        for d in events:  # kernels the profiler could not tie to a CPU op
            if d.device_type != DeviceType.CPU and getattr(d, "linked_correlation_id", 0) not in ids:
                items.append((d.time_range.end - d.time_range.start, None, kernel_kind(d.name)))
    else:
        for e in cpu_events:
            kind = "python/profiler overhead" if e.name.startswith("bench::") else op_kind(e.name)
            items.append((e.self_cpu_time_total, e, kind))

    by_part: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    total = 0.0
    for t, owner, kind in items:
        if not t or t <= 0:
            continue
        total += t
        part = part_of(owner)
        by_part[part] = by_part.get(part, 0.0) + t
        by_kind[kind] = by_kind.get(kind, 0.0) + t

    def summarize(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1])
        return {k: {"s_per_step": v / 1e6 / steps, "share": v / total if total else 0.0} for k, v in rows}

    # per part, forward + backward together
    merged: dict[str, float] = {}
    for part, t in by_part.items():
        key = part.replace(" [fwd]", "").replace(" [bwd]", "")
        merged[key] = merged.get(key, 0.0) + t
    return {
        "clock": "CUDA device time (sum of kernel time)" if cuda else "CPU self time (all threads)",
        "steps": steps,
        "total_s_per_step": total / 1e6 / steps,
        "by_part": summarize(merged) if module_labels else {},  # compiled layers cannot carry module hooks
        "by_part_fwd_bwd": summarize(by_part) if module_labels else {},
        "by_op_kind": summarize(by_kind),
    }


def format_profile(name: str, prof: dict) -> str:
    lines = [f"## {name}: {prof['clock']}, {prof['total_s_per_step'] * 1e3:.1f} ms per step ({prof['steps']} steps)"]
    for title, key in (("by model part", "by_part"), ("by model part, fwd/bwd", "by_part_fwd_bwd"),
                       ("by op kind", "by_op_kind")):
        if not prof[key]:
            continue
        lines.append(f"\n{title}:")
        for part, v in prof[key].items():
            lines.append(f"  {part:<52} {v['s_per_step'] * 1e3:9.2f} ms  {100 * v['share']:5.1f}%")
    lines += ["\ntop ops:", prof["table"], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Environment


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "triton", "vlm-orpo", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, dtype: torch.dtype, peak_override: float | None) -> dict:
    info = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        peak = peak_override
        if peak is None:
            peak = next((f for key, f in PEAK_FLOPS.get(dtype, []) if key in name), None)
        info.update(
            name=name,
            memory_gib=round(props.total_memory / GIB, 1),
            capability=f"{props.major}.{props.minor}",
            peak_flops=peak,
            peak_flops_source="--peak-tflops" if peak_override else "PEAK_FLOPS table (dense tensor core)",
        )
    else:
        info.update(
            name=_cpu_name(),
            threads=torch.get_num_threads(),
            cpus=os.cpu_count(),
            load_avg_1m_at_start=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            peak_flops=peak_override,
        )
    return info


# --------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--pairs-per-step", type=int, nargs="+", default=None,
                    help="one or more; default 1 4 8 for small, 1 for 7b")
    ap.add_argument("--variants", default=",".join(BASE_VARIANTS), help="comma list of " + ", ".join(BASE_VARIANTS))
    ap.add_argument("--grad-checkpointing", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                    help="non-reentrant, for every variant; 'both' runs every variant without, then with it")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (every variant)")
    ap.add_argument("--adapter-dtype", choices=["fp32", "model"], default="fp32",
                    help="LoRA weights in fp32 (PEFT's default, what training uses) or in the model dtype")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one gives the loss)")
    ap.add_argument("--lora-r", type=int, default=LORA_R)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak for MFU")
    ap.add_argument("--baseline", default=None, help="a JSON from this script whose plain variants give speed-ups")
    ap.add_argument("--profile", default=None, metavar="FILE", help="write a per-part profile of each variant here")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="print a markdown table of result files and exit")
    return ap.parse_args(argv)


def skipped_entry(reason: str, n_pairs: int, base: str, gc_on: bool, work: dict | None = None) -> dict:
    return {
        "base": base, "pairs_per_step": n_pairs, "grad_checkpointing": gc_on, "skipped": reason, "median_s": None,
        "pairs_per_s": None, "tokens_per_s": None, "mfu": None, "peak_gib": None, "loss": None,
        "tokens_per_step": (work or {}).get("tokens"),
    }


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_grad_checkpointing(model, on: bool):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()


def add_speedups(results: dict, baseline: dict, baseline_name: str | None):
    """speedup_vs_plain: plain's median / this median, same pairs/step and grad ckpt (this run, else --baseline)."""
    for r in results.values():
        key = (r["pairs_per_step"], r["grad_checkpointing"])
        here = next((v["median_s"] for v in results.values() if v["base"] == "plain" and v.get("median_s")
                     and (v["pairs_per_step"], v["grad_checkpointing"]) == key), None)
        ref = here or baseline.get(key)
        r["speedup_vs_plain"] = ref / r["median_s"] if ref and r.get("median_s") else None
        r["speedup_ref"] = ("this run" if here else baseline_name) if r["speedup_vs_plain"] else None


def load_baseline(path: str | None, seed: int, size: str) -> tuple[dict, dict]:
    """From a --baseline file: plain medians by (pairs/step, grad ckpt), and plain's loss values by name for
    the loss check (only when that run used the same size and seed, i.e. the same weights and pairs)."""
    medians, reference = {}, {}
    if path:
        rep = json.loads(Path(path).read_text())
        same_inputs = rep["config"].get("seed", 0) == seed and rep["config"].get("size") == size
        for name, v in rep["variants"].items():
            if v.get("base") != "plain" or not v.get("median_s"):
                continue
            gc_on = v.get("grad_checkpointing", rep["config"].get("grad_checkpointing") in (True, "on"))
            medians[(v["pairs_per_step"], gc_on)] = v["median_s"]
            if same_inputs and v.get("chosen_logp") and f"baseline:{name}" not in reference:
                vals = (v["loss"], torch.tensor(v["chosen_logp"]), torch.tensor(v["rejected_logp"]))
                reference[f"baseline:{name}"] = (v["pairs_per_step"], vals)
    return medians, reference


def run(args) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = SIZES[args.size]
    pairs_per_step = sorted(set(args.pairs_per_step or size.default_pairs_per_step))
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(wanted) - set(BASE_VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {BASE_VARIANTS}")
    if args.steps < 1:
        sys.exit("--steps must be >= 1")
    gc_modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    warmup = max(args.warmup, 3) if args.compile else args.warmup  # compile, then the dynamic-shape recompile

    print(f"[step_bench] size={args.size} device={device} dtype={dtype} pairs/step={pairs_per_step} "
          f"grad_ckpt={args.grad_checkpointing} compile={args.compile}", flush=True)
    t0 = time.perf_counter()
    model = build_model(size, device, dtype, args.seed)
    pairs = make_pairs(model, size, max(pairs_per_step), args.seed)
    model = attach_lora(model, args.lora_r, args.adapter_dtype)
    model.train()
    if args.compile:
        from vlm_orpo.modeling.compile import compile_decoder_layers

        compile_decoder_layers(model)
    setup_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    crops = crops_per_image(size, pairs[0].image_inputs)
    image_tokens = pairs[0].prompt_ids.count(size.image_token_id)
    print(f"[step_bench] model {n_params / 1e6:.1f}M params ({n_train / 1e6:.2f}M LoRA), {image_tokens} image "
          f"tokens/image ({crops} crops), setup {setup_s:.1f}s", flush=True)

    info = device_info(device, dtype, args.peak_tflops * 1e12 if args.peak_tflops else None)
    peak_flops = info.get("peak_flops")
    pad_id, image_id = 0, size.image_token_id
    baseline, reference = load_baseline(args.baseline, args.seed, args.size)
    results: dict[str, dict] = {}
    values: dict[str, tuple] = {}
    profiles: dict[str, dict] = {}
    report = {
        "benchmark": "benchmarks/step_bench.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "device": info,
        "versions": versions(),
        "config": {
            "size": args.size,
            "model": size.description,
            "dtype": str(dtype).replace("torch.", ""),
            "pairs_per_step": pairs_per_step,
            "grad_checkpointing": args.grad_checkpointing,
            "compile": args.compile,
            "steps": args.steps,
            "warmup": warmup,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "timed": "forward + backward of the mean ORPO loss (lambda 0.1); no optimizer step",
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": "all linear layers of the language model",
                     "init": "random A and B", "adapter_dtype": args.adapter_dtype},
            "params": n_params,
            "trainable_params": n_train,
            "image_hw": list(size.image_hw),
            "image_tokens": image_tokens,
            "crops_per_image": crops,
            "mfu_flops": "executed model FLOPs by formula (step_flops): frozen matmuls 2x fwd, LoRA and attention "
                         "3x fwd (attention over allowed query/key pairs only), LM head 2x fwd on the rows it runs "
                         "on, vision tower + projector fwd only; gradient-checkpointing recompute not counted",
            "seed": args.seed,
            "setup_s": setup_s,
        },
        "pairs": [{"prompt": len(p.prompt_ids), "chosen": len(p.chosen_ids), "rejected": len(p.rejected_ids)}
                  for p in pairs],
        "variants": results,
    }

    def save():  # after every variant, so a run cut short by a timeout still leaves its results
        add_speedups(results, baseline, args.baseline)
        report["loss_check"] = loss_check(values, results, dtype, reference)
        report["wall_s"] = time.perf_counter() - t_start
        if profiles:
            report["profile"] = {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in profiles.items()}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    failed = False  # a variant raised something other than out-of-memory
    for n in pairs_per_step:
        step_pairs = pairs[:n]
        if "plain" in wanted:
            name = "plain_logps" + ("" if n == 1 else f"_x{n}")
            set_attention_backend(model, "sdpa")
            try:
                reference[name] = (n, reference_values(model, step_pairs, pad_id))
            except torch.OutOfMemoryError:
                free_memory(device)
                print(f"[step_bench] {name}: out of memory (reference check skipped)", flush=True)
        for gc_on in gc_modes:
            set_grad_checkpointing(model, gc_on)
            for base in wanted:
                name = (base + ("" if n == 1 else f"_x{n}")
                        + ("+gc" if gc_on and args.grad_checkpointing == "both" else ""))
                t_variant = time.perf_counter()
                variant = prepare_variant(model, base, step_pairs, device, dtype, pad_id, image_id)
                set_attention_backend(model, variant.backend)
                if base == "packed_flex" and device.type != "cuda":
                    reason = (f"FlexAttention has no CPU backward in torch {torch.__version__}; "
                              "forward-only loss checked instead")
                    if name.replace("+gc", "") in values:  # grad ckpt does not change a forward-only loss
                        reason = f"FlexAttention has no CPU backward in torch {torch.__version__}"
                    else:
                        try:
                            values[name] = forward_only_values(model, variant)
                        except Exception as exc:  # noqa: BLE001 - the CPU inductor toolchain may be missing
                            reason = f"FlexAttention unavailable on CPU ({type(exc).__name__}: {str(exc)[:200]})"
                    entry = skipped_entry(reason, n, base, gc_on, variant.work)
                    if name in values:
                        entry.update(loss=values[name][0], loss_kind="forward only",
                                     chosen_logp=values[name][1].tolist(), rejected_logp=values[name][2].tolist())
                    entry["wall_s"] = time.perf_counter() - t_variant
                    results[name] = entry
                    print(f"[step_bench] {name}: skipped ({reason}) [{entry['wall_s']:.1f}s]", flush=True)
                    save()
                    continue
                if device.type == "cuda":
                    free_memory(device)
                    torch.cuda.reset_peak_memory_stats(device)
                print(f"[step_bench] {name}: {variant.work['tokens']} LM tokens, timing...", flush=True)
                try:
                    times, vals = time_variant(model, variant, device, warmup, args.steps)
                except Exception as exc:  # noqa: BLE001 - record it, go on with the other variants
                    oom = isinstance(exc, torch.OutOfMemoryError)
                    first_line = (str(exc).splitlines() or [""])[0][:200]
                    reason = f"out of memory: {first_line}" if oom else f"failed: {type(exc).__name__}: {first_line}"
                    del variant
                    model.zero_grad(set_to_none=True)
                    free_memory(device)
                    results[name] = skipped_entry(reason, n, base, gc_on)
                    failed |= not oom
                    print(f"[step_bench] {name}: {reason}", flush=True)
                    save()
                    continue
                peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
                median = statistics.median(times)
                work = variant.work
                flops = step_flops(size, work["tokens"], work["attended_pairs"], work["logit_rows"],
                                   crops * work["images"], args.lora_r)
                values[name] = vals
                results[name] = {
                    "base": base,
                    "pairs_per_step": n,
                    "grad_checkpointing": gc_on,
                    "backend": variant.backend,
                    "median_s": median,
                    "pairs_per_s": n / median,
                    "tokens_per_s": work["tokens"] / median,
                    "mfu": flops["total"] / median / peak_flops if peak_flops else None,
                    "peak_gib": peak,
                    "loss": vals[0],
                    "loss_kind": "train step",
                    "chosen_logp": vals[1].tolist(),  # per-pair mean log-probs, for cross-run loss checks
                    "rejected_logp": vals[2].tolist(),
                    "skipped": None,
                    "tokens_per_step": work["tokens"],
                    "attended_pairs": work["attended_pairs"],
                    "logit_rows": work["logit_rows"],
                    "images_per_step": work["images"],
                    "flops_per_step": flops,
                    "achieved_tflops": flops["total"] / median / 1e12,
                    "times_s": times,
                    "min_s": min(times),
                    "mean_s": statistics.fmean(times),
                    "wall_s": time.perf_counter() - t_variant,
                }
                print(f"[step_bench] {name}: median {median * 1e3:.1f} ms, loss {vals[0]:.6f}"
                      + (f", peak {peak:.2f} GiB" if peak is not None else "")
                      + f" [{results[name]['wall_s']:.1f}s]", flush=True)
                if args.profile and not gc_on:
                    try:
                        profiles[name] = profile_breakdown(model, variant, device, args.profile_steps,
                                                           module_labels=not args.compile)
                    except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the timing
                        print(f"[step_bench] {name}: profile failed: {type(exc).__name__}: {exc}", flush=True)
                del variant
                free_memory(device)
                save()

    report["complete"] = True
    save()
    if profiles:
        text = [f"# step_bench profile: size {args.size}, {info.get('name')}, {report['config']['dtype']}, "
                f"compile={args.compile}, {report['date']}\n"]
        text += [format_profile(k, v) for k, v in profiles.items()]
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text("\n".join(text))
    check = report["loss_check"]
    print()
    print(format_table(report))
    print(f"\nloss check ({check['tolerance']}): {'OK' if check['ok'] else 'MISMATCH'}")
    for line in check["details"]:
        print("  " + line)
    if args.json:
        print(f"wrote {args.json}")
    print(f"total wall time {report['wall_s']:.1f}s")
    if not check["ok"]:
        return 2
    return 3 if failed else 0


def loss_check(values: dict, results: dict, dtype, reference: dict | None = None) -> dict:
    """Within each pairs/step group: every variant's loss and per-pair mean log-probs against the first one.

    `reference` ({name: (pairs_per_step, values)}) goes first in its group: forward-only values of
    `modeling.reference.plain_logps`, and the plain variants of a --baseline file measured with the same seed
    (so the same weights and pairs), so a run without plain is still checked.
    """
    rtol = LOSS_RTOL[dtype]
    values = dict(values)
    groups: dict[int, list[str]] = {}
    for name, (n, vals) in (reference or {}).items():
        values[name] = vals
        groups.setdefault(n, []).append(name)
    for name in values:
        if name in results:
            groups.setdefault(results[name]["pairs_per_step"], []).append(name)
    ok, details, worst = True, [], {}
    for n, names in groups.items():
        ref = names[0]
        r_loss, r_ch, r_rej = values[ref]
        for name in names[1:]:
            loss, ch, rej = values[name]
            err = max(
                abs(loss - r_loss) / max(abs(r_loss), 1e-12),
                ((ch - r_ch).abs() / r_ch.abs().clamp_min(1e-12)).max().item(),
                ((rej - r_rej).abs() / r_rej.abs().clamp_min(1e-12)).max().item(),
            )
            good = err <= rtol and math.isfinite(loss)
            ok &= good
            worst[name] = err
            details.append(f"{name} vs {ref}: loss {loss:.6f} vs {r_loss:.6f}, max rel err {err:.2e} "
                           f"{'ok' if good else 'MISMATCH'}")
        if len(names) == 1:
            details.append(f"{ref}: loss {r_loss:.6f} (nothing to compare at {n} pairs/step)")
    return {"ok": bool(ok), "rtol": rtol, "tolerance": f"relative {rtol:g} ({str(dtype).replace('torch.', '')})",
            "compared": "loss and per-pair mean chosen/rejected log-probs, per pairs/step group",
            "max_rel_err": worst, "details": details}


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def format_table(report: dict) -> str:
    dev = report["device"]
    head = (f"{report['config']['size']} on {dev.get('name')} ({dev['type']}), {report['config']['dtype']}, "
            f"grad_ckpt={report['config']['grad_checkpointing']}, compile={report['config']['compile']}, "
            f"{report['config']['steps']} timed steps")
    cols = ["variant", "pairs/step", "median s", "pairs/s", "tokens/s", "tokens/step", "MFU", "peak GiB", "loss",
            "vs plain"]
    rows = []
    for name, r in report["variants"].items():
        if r.get("skipped"):
            rows.append([name, str(r["pairs_per_step"]), "skipped", "", "", _fmt(r.get("tokens_per_step"), "d"), "",
                         "", _fmt(r.get("loss"), ".5f"), ""])
            continue
        rows.append([
            name, str(r["pairs_per_step"]), _fmt(r["median_s"], ".4f"), _fmt(r["pairs_per_s"], ".2f"),
            _fmt(r["tokens_per_s"], ".0f"), _fmt(r["tokens_per_step"], "d"), _fmt(r["mfu"], ".1%"),
            _fmt(r["peak_gib"], ".2f"), _fmt(r["loss"], ".5f"), _fmt(r.get("speedup_vs_plain"), ".2f") + "x"
            if r.get("speedup_vs_plain") else "-",
        ])
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    reasons: dict[str, list[str]] = {}
    for n, r in report["variants"].items():
        if r.get("skipped"):
            reasons.setdefault(r["skipped"], []).append(n)
    lines += [f"skipped {', '.join(names)}: {reason}" for reason, names in reasons.items()]
    return "\n".join(lines)


def _entry_gc(rep: dict, v: dict) -> bool:
    return bool(v.get("grad_checkpointing", rep["config"].get("grad_checkpointing") in (True, "on")))


def summarize(paths: list[str]) -> str:
    """One markdown table over several result files (e.g. everything gpu_run.sh wrote).

    "vs eager plain" compares with the uncompiled plain variant at the same pairs/step and grad-ckpt setting,
    from any of the files measured on the same device name.
    """
    reports = []
    for p in paths:
        try:
            reports.append((p, json.loads(Path(p).read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {p}: {exc}", file=sys.stderr)
    eager_plain = {}
    for _, rep in reports:
        if rep["config"].get("compile"):
            continue
        for v in rep["variants"].values():
            if v.get("base") == "plain" and v.get("median_s"):
                key = (rep["device"].get("name"), rep["config"]["size"], v["pairs_per_step"], _entry_gc(rep, v))
                eager_plain[key] = v
    cols = ["file", "variant", "pairs/step", "grad ckpt", "compile", "median s", "pairs/s", "MFU", "peak GiB",
            "loss", "vs eager plain", "mem vs eager plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for path, rep in reports:
        c = rep["config"]
        for name, v in rep["variants"].items():
            gc_on = _entry_gc(rep, v)
            ref = eager_plain.get((rep["device"].get("name"), c["size"], v["pairs_per_step"], gc_on))
            speed = ref["median_s"] / v["median_s"] if ref and v.get("median_s") else None
            mem = v["peak_gib"] / ref["peak_gib"] if ref and v.get("peak_gib") and ref.get("peak_gib") else None
            lines.append("| " + " | ".join([
                Path(path).name, name, str(v["pairs_per_step"]), "on" if gc_on else "off", str(c["compile"]),
                "skipped: " + v["skipped"][:60] if v.get("skipped") else _fmt(v["median_s"], ".4f"),
                _fmt(v.get("pairs_per_s"), ".2f"), _fmt(v.get("mfu"), ".1%"), _fmt(v.get("peak_gib"), ".1f"),
                _fmt(v.get("loss"), ".4f"), (_fmt(speed, ".2f") + "x") if speed else "-",
                (_fmt(mem, ".2f") + "x") if mem else "-",
            ]) + " |")
    head = []
    for dev in sorted({r["device"].get("name") or "?" for _, r in reports}):
        reps = [r for _, r in reports if (r["device"].get("name") or "?") == dev]
        dates = sorted(r["date"] for r in reps)
        vers = sorted({f"torch {r['versions'].get('torch')}, transformers {r['versions'].get('transformers')}, "
                       f"peft {r['versions'].get('peft')}" for r in reps})
        head.append(f"device: {dev}; {dates[0]} .. {dates[-1]}; {' / '.join(vers)}")
    incomplete = [Path(p).name for p, r in reports if not r.get("complete", True)]
    if incomplete:
        head.append("incomplete runs (cut short): " + ", ".join(incomplete))
    return "\n".join([*head, "", *lines])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
