"""FLOPs of a training step by formula, for MFU: the work a step executes, counted per component, so variants
that skip masked-out attention or LM-head rows are not credited for work they never do."""

from __future__ import annotations

import torch

from vlm_orpo.data.packing import EncodedPair

from .families import FAMILIES, Size

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
FORMULA = ("executed model FLOPs by formula (step_flops): frozen matmuls 2x fwd, LoRA and attention 3x fwd "
           "(attention over allowed query/key pairs only), LM head 2x fwd on the rows it runs on, vision tower + "
           "projector fwd only; gradient-checkpointing recompute not counted")


def formula(size: Size) -> str:
    """What MFU counts for this size: the vision term is CLIP's (LLaVA-NeXT); other towers are left out."""
    if FAMILIES[size.family].clip_vision:
        return FORMULA
    return (FORMULA.replace("vision tower + projector fwd only", "vision tower and projector NOT counted")
            + f"; {size.family}'s text model is counted by the same formula, its vision work is not, so MFU is a "
              "lower bound")


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The table's peak for a CUDA device name; None (no MFU) for a device it does not know."""
    return next((f for key, f in PEAK_FLOPS.get(dtype, []) if key in device_name), None)


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


def step_flops(size: Size, tokens: int, attended_pairs: int, logit_rows: int, crops: int | None, r: int) -> dict:
    """FLOPs of one training step, by component.

    Frozen base matmuls: forward + input-gradient = 2x forward (no weight gradient). LoRA (A and B trained):
    3x forward. Attention scores/values: 4 * attended (query, key) pairs * heads * head_dim forward, 3x for
    training; `attended_pairs` counts only the pairs the mask allows (causal, and rejected never sees chosen),
    so no variant is credited for masked-out work. LM head: 2x forward on the rows whose logits are computed
    (all tokens for plain, only answer-predicting positions for packed). Vision tower + projector: forward only,
    by CLIP's formula over `crops` (None for a family whose tower it does not describe: 0, see `formula`).
    Elementwise ops (norms, rope, SiLU, softmax, log-softmax) are not counted.
    """
    d, heads, _, dh, _, layers, vocab = _text_dims(size)
    linears = text_linears(size)
    base = 2 * tokens * sum(i * o for i, o in linears) * layers
    lora = 2 * tokens * sum(r * (i + o) for i, o in linears) * layers
    attention = 4 * attended_pairs * heads * dh * layers
    lm_head = 2 * logit_rows * d * vocab
    vision = vision_forward_flops(size, crops) if crops is not None else 0.0
    parts = {
        "linear": 2 * base,
        "lora": 3 * lora,
        "attention": 3 * attention,
        "lm_head": 2 * lm_head,
        "vision": vision,
    }
    parts["total"] = sum(parts.values())
    return parts


def plain_work(pairs: list[EncodedPair]) -> dict:
    """What a plain step runs: the k + 1 sequences of every prompt in full, causal, logits on every position."""
    seqs = [len(p.prompt_ids) + len(a) for p in pairs for a in (p.chosen_ids, *p.all_rejected_ids)]
    return {
        "tokens": sum(seqs),
        "attended_pairs": sum(n * (n + 1) // 2 for n in seqs),
        "logit_rows": sum(seqs),
        "images": len(seqs),
    }


def packed_work(pairs: list[EncodedPair], batch: dict) -> dict:
    """What a packed step runs: the prefix once, each rejected answer attending to the prompt and itself only,
    logits only on the rows the collator keeps."""
    attended = 0
    for p in pairs:
        P, C = len(p.prompt_ids), len(p.chosen_ids)
        attended += (P + C) * (P + C + 1) // 2 + sum(R * P + R * (R + 1) // 2 for R in map(len, p.all_rejected_ids))
    return {
        "tokens": sum(len(p) for p in pairs),
        "attended_pairs": attended,
        "logit_rows": int(batch["logits_to_keep"].numel()) * int(batch["input_ids"].shape[0]),
        "images": len(pairs),
    }


def work_flops(size: Size, work: dict, crops: int | None, r: int) -> dict:
    """`step_flops` of a step described by `plain_work` or `packed_work` (`crops` per image, None: not counted)."""
    crops = crops * work["images"] if crops is not None else None
    return step_flops(size, work["tokens"], work["attended_pairs"], work["logit_rows"], crops, r)
