#!/usr/bin/env python
"""Training-step benchmark: the plain two-sequence ORPO forward against the packed shared-prefix one.

One process, one model, the same pairs for every variant:

  plain          two sequences per pair ([prompt+chosen], [prompt+rejected]), the image in each, full logits
                 (what TRL's ORPOTrainer does; `modeling.plain.plain_logps`)
  packed_sdpa    one row [prompt, chosen, rejected] per pair, dense bool mask (`shared_prefix.dense_mask`)
  packed_pairs   the same row, attention over each pair's own tokens only: two SDPA calls a layer, no mask
                 (`modeling.attention`)
  packed_flex    the same row with a FlexAttention BlockMask (`shared_prefix.block_mask`)
  <variant>_xN   N pairs per step: plain batches 2N sequences; packed puts all N pairs in one row
  <variant>_kK   K rejected answers per prompt (--rejected-per-prompt): K pairs (chosen, rejected i) a prompt;
                 plain runs K + 1 sequences a prompt, each with the image; packed one group [P, C, R1..RK], each
                 answer seeing only the prompt and itself. The loss is the mean over all N * K pairs
  --loss dpo     DPO (sigmoid, beta 0.1) instead of ORPO, with its reference: the same model with the adapter
                 disabled, a forward without grad on the variant's own layout in every step (plain: two more
                 sequences per pair, as TRL's DPOTrainer with a LoRA policy runs it; packed: one more packed row);
  <variant>_preref  packed variants with the reference's log-probs computed once before timing
                 (`loss.precompute_reference`), so the step runs no reference forward

A step is forward + backward of the mean loss over the step's pairs, LoRA r=16 on every linear layer of
the language model (random A and B, so every gradient is real); there is no optimizer step (a LoRA AdamW
step is well under 1% of a step, and leaving the weights alone keeps every step's loss identical).
Timing: `--warmup` untimed steps, then the median of `--steps` (default 10) steps, each bracketed by
`torch.cuda.synchronize()` on CUDA. The losses of all variants must agree (fp32: 1e-4 relative; bf16/fp16:
1e-2); the script exits with status 2 if they do not, and 3 if a variant failed (out of memory is recorded
as a skip, not a failure). The --json file is rewritten after every variant, so a run cut short keeps what
it measured ("complete": false).

Families (--family, default llava_next; `all` or several names run one after another into one JSON):
llava_next, llava_onevision, internvl, mistral3, qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3, idefics3, smolvlm.
Each runs through the project's own family code (Qwen's M-RoPE positions, Gemma 3's dense per-layer masks, ...);
a variant whose attention backend the family does not support (Gemma 3: sdpa only) is recorded as skipped.
Sizes (random weights, built from a config, nothing downloaded; all in benchmarks/bench/families.py):
  7b       llava_next: llava-v1.6-mistral-7b architecture: Mistral-7B text model, CLIP ViT-L/14-336, anyres grid;
           a 640x480 image gives 2340 image tokens; ~40-token question; answers lognormal around 150 tokens.
           qwen2_5_vl: Qwen2.5-VL-7B-Instruct architecture; a 1024x768 image gives 999 image tokens; same text
  small    every family at the same scale (d=128, 2 layers, vocab 2048; vision width 64, 2 layers; 190-320
           image tokens), so the whole benchmark of one family runs in well under 2 minutes on 2 CPU cores
  7b-tiny  the 7b input geometry with tiny widths, to check the 7b path on a CPU
MFU counts the vision tower only for LLaVA-NeXT (CLIP's formula); for the other families it is text only.

    python benchmarks/step_bench.py --size small --device cpu --json out.json
    python benchmarks/step_bench.py --size 7b --device cuda --pairs-per-step 1 --compile --json out.json
    python benchmarks/step_bench.py --size small --device cpu --rejected-per-prompt 1 3 7 --json out.json
    python benchmarks/step_bench.py --size small --device cpu --loss dpo --variants plain,packed_pairs --json out.json
    python benchmarks/step_bench.py --family all --size small --device cpu --pairs-per-step 1 8 --json out.json
    python benchmarks/step_bench.py --family qwen2_5_vl --size 7b --device cuda --json out.json
    python benchmarks/step_bench.py --summarize benchmarks/results/*.json      # markdown table of results

This file is the command line (flags, setup, and a loop of `measure` over the variants); the harness it drives
is the package benchmarks/bench/ (geometry, steps, flops, profiling, env, report).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import dataclass
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

import torch  # noqa: E402
from bench.env import GIB, device_info, load_average, machine, versions  # noqa: E402
from bench.families import SIZES, Size, size_of  # noqa: E402
from bench.flops import formula, work_flops  # noqa: E402
from bench.geometry import (  # noqa: E402
    LORA_R,
    attach_lora,
    build_model,
    crops_per_image,
    make_pairs,
    with_rejected,
)
from bench.profiling import profile_breakdown  # noqa: E402
from bench.report import Report, family_table, skipped_entry, summarize, timed_entry  # noqa: E402
from bench.steps import (  # noqa: E402
    BASE_VARIANTS,
    LOSSES,
    Step,
    Variant,
    backend_of,
    forward_only_values,
    free_memory,
    prepare_step,
    reference_values,
    set_grad_checkpointing,
    time_step,
)

from vlm_orpo.errors import first_line  # noqa: E402
from vlm_orpo.modeling.families import family_for  # noqa: E402
from vlm_orpo.modeling.shared_prefix import set_attention_backend, unwrap  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PAD_ID = 0
REFERENCE_SUFFIX = {"none": "", "live": "", "precomputed": "_preref"}
TIMED = {
    "orpo": "forward + backward of the mean ORPO loss (lambda 0.1); no optimizer step",
    "dpo": "forward + backward of the mean DPO loss (sigmoid, beta 0.1) with its reference forward (adapter disabled, "
           "no grad) in the step, or precomputed before timing (_preref); no optimizer step; MFU counts the policy only",
}


@dataclass
class Bench:
    """One model and one set of pairs, shared by every variant of the run, and the flags that time them."""

    args: argparse.Namespace
    size: Size
    device: torch.device
    dtype: torch.dtype
    model: object
    pairs: list
    crops: int | None  # vision-tower crops per image (LLaVA-NeXT; None: the FLOP formula leaves vision out)
    info: dict  # the device, with its peak FLOP/s for MFU (`bench.env.device_info`)
    warmup: int
    setup_s: float


def log(message: str):
    print(f"[step_bench] {message}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["llava_next"], metavar="FAMILY",
                    help=f"one or more of {', '.join(SIZES)}, or all (default llava_next)")
    ap.add_argument("--size", choices=sorted({s for sizes in SIZES.values() for s in sizes}), default="small")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--pairs-per-step", type=int, nargs="+", default=None,
                    help="one or more; default 1 4 8 for small, 1 for 7b")
    ap.add_argument("--rejected-per-prompt", type=int, nargs="+", default=[1], metavar="K",
                    help="one or more: rejected answers per prompt (K pairs sharing one prompt); default 1")
    ap.add_argument("--variants", default=",".join(BASE_VARIANTS), help="comma list of " + ", ".join(BASE_VARIANTS))
    ap.add_argument("--loss", choices=sorted(LOSSES), default="orpo",
                    help="orpo (no reference) or dpo (reference in the step, and precomputed for packed variants)")
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
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="write a per-part profile of each variant here (one family)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="print a markdown table of result files and exit")
    return ap.parse_args(argv)


def plan(args) -> list[Variant]:
    """The variants in the order they run: by pairs/step, then rejected/prompt, then grad ckpt off before on,
    then --variants."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(wanted) - set(BASE_VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {BASE_VARIANTS}")
    gc_modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    gc_suffix = "+gc" if args.grad_checkpointing == "both" else ""
    return [Variant(base + pairs_suffix(n) + rejected_suffix(k) + REFERENCE_SUFFIX[ref] + (gc_suffix if gc_on else ""),
                    base, n, gc_on, k, ref)
            for n in pairs_per_step(args) for k in rejected_per_prompt(args) for gc_on in gc_modes for base in wanted
            for ref in references(args, base)]


def references(args, base: str) -> list[str]:
    """ORPO has no reference; DPO's runs live in every variant's step, and precomputed in the packed ones too
    (TRL refuses to precompute reference log-probs for vision data)."""
    if args.loss == "orpo":
        return ["none"]
    return ["live"] if base == "plain" else ["live", "precomputed"]


def pairs_per_step(args) -> list[int]:
    return sorted(set(args.pairs_per_step or size_of(args.family, args.size).default_pairs_per_step))


def pairs_suffix(n: int) -> str:
    """Variant names carry their pairs/step from 2 on: plain, plain_x4."""
    return "" if n == 1 else f"_x{n}"


def rejected_per_prompt(args) -> list[int]:
    if min(args.rejected_per_prompt) < 1:
        sys.exit("--rejected-per-prompt must be >= 1")
    return sorted(set(args.rejected_per_prompt))


def rejected_suffix(k: int) -> str:
    """Variant names carry their rejected/prompt from 2 on: plain_x4, plain_x4_k3."""
    return "" if k == 1 else f"_k{k}"


def setup(args) -> Bench:
    """The model (random weights, LoRA, optionally compiled layers) and the pairs every variant runs on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    if args.steps < 1:
        sys.exit("--steps must be >= 1")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = size_of(args.family, args.size)
    warmup = max(args.warmup, 3) if args.compile else args.warmup  # compile, then the dynamic-shape recompile
    log(f"family={args.family} size={args.size} device={device} dtype={dtype} pairs/step={pairs_per_step(args)} "
        f"rejected/prompt={rejected_per_prompt(args)} "
        f"grad_ckpt={args.grad_checkpointing} compile={args.compile}")
    t0 = time.perf_counter()
    model = build_model(size, device, dtype, args.seed)
    pairs = make_pairs(model, size, max(pairs_per_step(args)), args.seed, max(rejected_per_prompt(args)))
    model = attach_lora(model, args.lora_r, args.adapter_dtype)
    model.train()
    if args.compile:
        from vlm_orpo.modeling.compile import compile_decoder_layers

        compile_decoder_layers(model)
    setup_s = time.perf_counter() - t0
    info = device_info(device, dtype, args.peak_tflops * 1e12 if args.peak_tflops else None)
    crops = crops_per_image(size, pairs[0].image_inputs)
    return Bench(args, size, device, dtype, model, pairs, crops, info, warmup, setup_s)


def header(b: Bench) -> dict:
    """The report's header: device, versions and everything that defines the run (logged in one line too)."""
    args, size = b.args, b.size
    n_params = sum(p.numel() for p in b.model.parameters())
    n_train = sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    image_tokens = b.pairs[0].prompt_ids.count(size.image_token_id)
    crops = f" ({b.crops} crops)" if b.crops is not None else ""
    log(f"model {n_params / 1e6:.1f}M params ({n_train / 1e6:.2f}M LoRA), {image_tokens} image "
        f"tokens/image{crops}, setup {b.setup_s:.1f}s")
    return {
        "benchmark": "benchmarks/step_bench.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "device": b.info,
        "versions": versions(),
        "config": {
            "family": args.family,
            "size": args.size,
            "model": size.description,
            "dtype": str(b.dtype).replace("torch.", ""),
            "pairs_per_step": pairs_per_step(args),
            "rejected_per_prompt": rejected_per_prompt(args),
            "grad_checkpointing": args.grad_checkpointing,
            "compile": args.compile,
            "steps": args.steps,
            "warmup": b.warmup,
            "threads": torch.get_num_threads() if b.device.type == "cpu" else None,
            "loss": args.loss,
            "timed": TIMED[args.loss],
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": "all linear layers of the language model",
                     "init": "random A and B", "adapter_dtype": args.adapter_dtype},
            "params": n_params,
            "trainable_params": n_train,
            "image_hw": list(size.image_hw),
            "image_tokens": image_tokens,
            "crops_per_image": b.crops,
            "mfu_flops": formula(size),
            "seed": args.seed,
            "setup_s": b.setup_s,
        },
        "pairs": [{"prompt": len(p.prompt_ids), "chosen": len(p.chosen_ids), "rejected": len(p.rejected_ids),
                   **({"more_rejected": list(map(len, p.more_rejected_ids))} if p.more_rejected_ids else {})}
                  for p in b.pairs],
    }


def flex_forward_only(v: Variant, step: Step, values: dict) -> tuple[dict, tuple | None]:
    """FlexAttention has no CPU backward: a skipped entry that still carries the forward-only loss, checked once
    per pairs/step (grad ckpt does not change a forward-only loss)."""
    reason = f"FlexAttention has no CPU backward in torch {torch.__version__}"
    vals = None
    if v.name.replace("+gc", "") not in values:
        try:
            vals = forward_only_values(step)
            reason += "; forward-only loss checked instead"
        except Exception as exc:  # noqa: BLE001 - the CPU inductor toolchain may be missing
            reason = f"FlexAttention unavailable on CPU ({type(exc).__name__}: {str(exc)[:200]})"
    return skipped_entry(reason, v, step.work, vals), vals


def measure(b: Bench, v: Variant, values: dict) -> tuple[dict, tuple | None, dict | None, bool]:
    """Time one variant: (its report entry, its loss values, its profile, whether it failed). Out of memory and
    variants that cannot run on this device become entries with the reason; `values` are those measured so far."""
    t0 = time.perf_counter()
    family = family_for(unwrap(b.model).config)
    if backend_of(v.base) not in family.backends:
        entry = skipped_entry(f"{family.name} supports the {', '.join(family.backends)} backend(s) only", v)
        log(f"{v.name}: skipped ({entry['skipped']})")
        return entry, None, None, False
    set_grad_checkpointing(b.model, v.grad_checkpointing)
    pairs = with_rejected(b.pairs[: v.n_pairs], v.rejected_per_prompt)
    step = prepare_step(b.model, v.base, pairs, b.device, b.dtype, PAD_ID, b.size.image_token_id, v.reference)
    set_attention_backend(b.model, step.backend)
    if v.base == "packed_flex" and b.device.type != "cuda":
        entry, vals = flex_forward_only(v, step, values)
        entry["wall_s"] = time.perf_counter() - t0
        log(f"{v.name}: skipped ({entry['skipped']}) [{entry['wall_s']:.1f}s]")
        return entry, vals, None, False
    if b.device.type == "cuda":
        free_memory(b.device)
        torch.cuda.reset_peak_memory_stats(b.device)
    log(f"{v.name}: {step.work['tokens']} LM tokens, timing...")
    try:
        times, vals = time_step(b.model, step, b.device, b.warmup, b.args.steps)
    except Exception as exc:  # noqa: BLE001 - record it, go on with the other variants
        oom = isinstance(exc, torch.OutOfMemoryError)
        reason = (f"out of memory: {first_line(exc, with_type=False)[:200]}" if oom
                  else f"failed: {first_line(exc)[:250]}")
        del step
        b.model.zero_grad(set_to_none=True)
        free_memory(b.device)
        log(f"{v.name}: {reason}")
        return skipped_entry(reason, v), None, None, not oom
    peak = torch.cuda.max_memory_allocated(b.device) / GIB if b.device.type == "cuda" else None
    flops = work_flops(b.size, step.work, b.crops, b.args.lora_r)
    entry = timed_entry(v, step, times, vals, flops, b.info.get("peak_flops"), peak)
    entry["wall_s"] = time.perf_counter() - t0
    log(f"{v.name}: median {entry['median_s'] * 1e3:.1f} ms, loss {vals[0]:.6f}"
        + (f", peak {peak:.2f} GiB" if peak is not None else "") + f" [{entry['wall_s']:.1f}s]")
    profile = None
    if b.args.profile and not v.grad_checkpointing:
        try:
            profile = profile_breakdown(b.model, step, b.device, b.args.profile_steps,
                                        module_labels=not b.args.compile)
        except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the timing
            log(f"{v.name}: profile failed: {type(exc).__name__}: {exc}")
    del step
    free_memory(b.device)
    return entry, vals, profile, False


def check_reference(b: Bench, report: Report, v: Variant):
    """Forward-only values of `modeling.plain.plain_logps` (the tests' oracle) head the loss check."""
    n, k = v.group
    name = "plain_logps" + pairs_suffix(n) + rejected_suffix(k)
    set_attention_backend(b.model, "sdpa")
    try:
        report.add_reference(name, v.group, reference_values(b.model, with_rejected(b.pairs[:n], k), PAD_ID,
                                                             b.args.loss))
    except torch.OutOfMemoryError:
        free_memory(b.device)
        log(f"{name}: out of memory (reference check skipped)")


def run(args) -> tuple[int, dict]:
    """One family: (exit status, the report)."""
    t_start = time.perf_counter()
    variants = plan(args)
    b = setup(args)
    report = Report(args.json, header(b), b.dtype, args.baseline, t_start)
    with_plain = any(v.base == "plain" for v in variants)
    checked = set()  # groups whose `plain_logps` reference was taken, before their first variant
    for v in variants:
        if with_plain and v.group not in checked:
            checked.add(v.group)
            check_reference(b, report, v)
        report.add(v.name, *measure(b, v, report.values))
    title = (f"# step_bench profile: {args.family} size {args.size}, {b.info.get('name')}, "
             f"{report.data['config']['dtype']}, compile={args.compile}, {report.data['date']}")
    return report.finish(args.profile, title), report.data


def run_families(args, families: list[str]) -> int:
    """Each family in turn, in this process, into one JSON (rewritten after each family, so a run cut short keeps
    the families it finished) with the machine and its load average before and after; then one table."""
    if args.profile or args.baseline:
        sys.exit("--profile and --baseline take one family")
    combined = {"benchmark": "benchmarks/step_bench.py",
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "complete": False, "machine": machine(), "load_avg_start": load_average(), "families": {}}
    status = 0
    for family in families:
        rc, data = run(argparse.Namespace(**{**vars(args), "family": family, "json": None}))
        status = status or rc
        combined["families"][family] = data
        combined["load_avg_end"] = load_average()
        combined["complete"] = family == families[-1]
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(combined, indent=2) + "\n")
    print()
    print(family_table(combined))
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    families = list(SIZES) if args.family == ["all"] else list(dict.fromkeys(args.family))
    for family in families:
        size_of(family, args.size)  # every family and size exists before anything runs
    if len(families) > 1:
        return run_families(args, families)
    args.family = families[0]
    return run(args)[0]


if __name__ == "__main__":
    sys.exit(main())
