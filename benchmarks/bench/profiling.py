"""Where a step's time goes: torch.profiler events charged to model parts (forward, and backward through the
autograd sequence number to the forward op that made each node) and to op kinds, on the CPU and on CUDA."""

from __future__ import annotations

import torch

from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.shared_prefix import unwrap

from .steps import Step, sync, train_step

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


def profile_breakdown(model, step: Step, device, steps: int = 2, module_labels: bool = True) -> dict:
    """Time of `steps` training steps (CUDA: kernel time, each kernel charged to the op that launched it; CPU: op
    self time), grouped two ways:
    by model part (forward, and backward attributed to the forward op that made each autograd node), and by
    op kind (matmul / attention kernel / elementwise / copy). Returns a dict plus the profiler's own table.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = PartLabels(model) if module_labels else None
    try:
        train_step(model, step)  # hooks in place before profiling (first hooked call may be slower)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                train_step(model, step)
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
