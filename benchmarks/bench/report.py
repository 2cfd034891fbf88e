"""The run's report: one JSON entry per variant, the loss check across variants, speed-ups against plain,
and the markdown tables (one run, or several result files with `--summarize`)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from .profiling import format_profile
from .steps import Step, Variant

LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


class Report:
    """One run's JSON, rewritten after every variant so a run cut short keeps what it measured ("complete":
    false); the loss check and speed-ups are recomputed at each write."""

    def __init__(self, path: str | None, header: dict, dtype: torch.dtype, baseline: str | None, t_start: float):
        self.path, self.dtype, self.baseline = path, dtype, baseline
        config = header["config"]
        # plain medians of --baseline for speed-ups; its plain loss values join the loss check (same seed, size)
        self.medians, self.reference = load_baseline(baseline, config["seed"], config["size"], config["family"])
        self.values: dict[str, tuple] = {}  # loss values of the variants, by name
        self.profiles: dict[str, dict] = {}
        self.failed = False  # a variant raised something other than out of memory
        self.t_start = t_start  # wall_s counts the whole run, setup included
        self.data = {**header, "variants": {}}

    def add_reference(self, name: str, group: tuple[int, int], values: tuple):
        """Loss values that go first in their group (`Variant.group`) of the loss check (`plain_logps` itself)."""
        self.reference[name] = (group, values)

    def add(self, name: str, entry: dict, values: tuple | None = None, profile: dict | None = None,
            failed: bool = False):
        """Record one variant (what `measure` returns) and rewrite the file."""
        self.data["variants"][name] = entry
        if values is not None:
            self.values[name] = values
        if profile is not None:
            self.profiles[name] = profile
        self.failed |= failed
        self.save()

    def save(self):
        results = self.data["variants"]
        add_speedups(results, self.medians, self.baseline)
        self.data["loss_check"] = loss_check(self.values, results, self.dtype, self.reference)
        self.data["wall_s"] = time.perf_counter() - self.t_start
        if self.profiles:
            self.data["profile"] = {k: {kk: vv for kk, vv in v.items() if kk != "table"}
                                    for k, v in self.profiles.items()}
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.data, indent=2) + "\n")

    def finish(self, profile_path: str | None, profile_title: str) -> int:
        """Final write, tables and loss check printed; exit status 2 on a loss mismatch, 3 if a variant failed."""
        self.data["complete"] = True
        self.save()
        if self.profiles and profile_path:
            text = [profile_title + "\n", *(format_profile(k, v) for k, v in self.profiles.items())]
            Path(profile_path).parent.mkdir(parents=True, exist_ok=True)
            Path(profile_path).write_text("\n".join(text))
        check = self.data["loss_check"]
        print()
        print(format_table(self.data))
        print(f"\nloss check ({check['tolerance']}): {'OK' if check['ok'] else 'MISMATCH'}")
        for line in check["details"]:
            print("  " + line)
        if self.path:
            print(f"wrote {self.path}")
        print(f"total wall time {self.data['wall_s']:.1f}s")
        if not check["ok"]:
            return 2
        return 3 if self.failed else 0


def timed_entry(variant: Variant, step: Step, times: list[float], values: tuple, flops: dict,
                peak_flops: float | None, peak_gib: float | None) -> dict:
    """A measured variant: throughput, MFU by formula, the loss values it gave, and every step time."""
    median = statistics.median(times)
    loss, chosen, rejected = values
    work = step.work
    return {
        "base": variant.base,
        "pairs_per_step": variant.n_pairs,
        "rejected_per_prompt": variant.rejected_per_prompt,
        "grad_checkpointing": variant.grad_checkpointing,
        "backend": step.backend,
        "median_s": median,
        "pairs_per_s": variant.n_pairs * variant.rejected_per_prompt / median,  # preference pairs (chosen, rejected i)
        "tokens_per_s": work["tokens"] / median,
        "mfu": flops["total"] / median / peak_flops if peak_flops else None,
        "peak_gib": peak_gib,
        "loss": loss,
        "loss_kind": "train step",
        "chosen_logp": chosen.tolist(),  # per-pair mean log-probs, for cross-run loss checks
        "rejected_logp": rejected.tolist(),
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
    }


def skipped_entry(reason: str, variant: Variant, work: dict | None = None, forward_values: tuple | None = None) -> dict:
    """A variant that did not run here, with the reason; the contract's numbers are null, except the loss when a
    forward-only loss was taken instead."""
    entry = {
        "base": variant.base, "pairs_per_step": variant.n_pairs, "rejected_per_prompt": variant.rejected_per_prompt,
        "grad_checkpointing": variant.grad_checkpointing, "skipped": reason, "median_s": None, "pairs_per_s": None,
        "tokens_per_s": None, "mfu": None, "peak_gib": None, "loss": None,
        "tokens_per_step": (work or {}).get("tokens"),
    }
    if forward_values is not None:
        loss, chosen, rejected = forward_values
        entry.update(loss=loss, loss_kind="forward only", chosen_logp=chosen.tolist(), rejected_logp=rejected.tolist())
    return entry


def entry_group(v: dict) -> tuple[int, int]:
    """An entry's `Variant.group`: (pairs/step, rejected/prompt); files from before several rejected had k = 1."""
    return v["pairs_per_step"], v.get("rejected_per_prompt", 1)


def add_speedups(results: dict, baseline: dict, baseline_name: str | None):
    """speedup_vs_plain: plain's median / this median, same pairs/step, rejected/prompt and grad ckpt (this run,
    else --baseline)."""
    for r in results.values():
        key = (*entry_group(r), r["grad_checkpointing"])
        here = next((v["median_s"] for v in results.values() if v["base"] == "plain" and v.get("median_s")
                     and (*entry_group(v), v["grad_checkpointing"]) == key), None)
        ref = here or baseline.get(key)
        r["speedup_vs_plain"] = ref / r["median_s"] if ref and r.get("median_s") else None
        r["speedup_ref"] = ("this run" if here else baseline_name) if r["speedup_vs_plain"] else None


def load_baseline(path: str | None, seed: int, size: str, family: str) -> tuple[dict, dict]:
    """From a --baseline file: plain medians by (pairs/step, rejected/prompt, grad ckpt), and plain's loss values
    by name for the loss check (only when that run used the same family, size and seed, i.e. the same weights and
    pairs)."""
    medians, reference = {}, {}
    if path:
        rep = json.loads(Path(path).read_text())
        c = rep["config"]
        same_inputs = (c.get("seed", 0), c.get("size"), _family(rep)) == (seed, size, family)
        for name, v in rep["variants"].items():
            if v.get("base") != "plain" or not v.get("median_s"):
                continue
            medians[(*entry_group(v), _entry_gc(rep, v))] = v["median_s"]
            if same_inputs and v.get("chosen_logp") and f"baseline:{name}" not in reference:
                vals = (v["loss"], torch.tensor(v["chosen_logp"]), torch.tensor(v["rejected_logp"]))
                reference[f"baseline:{name}"] = (entry_group(v), vals)
    return medians, reference


def loss_check(values: dict, results: dict, dtype, reference: dict | None = None) -> dict:
    """Within each group (pairs/step, rejected/prompt): every variant's loss and per-pair mean log-probs against
    the first one.

    `reference` ({name: (group, values)}) goes first in its group: forward-only values of
    `modeling.plain.plain_logps`, and the plain variants of a --baseline file measured with the same seed
    (so the same weights and pairs), so a run without plain is still checked.
    """
    rtol = LOSS_RTOL[dtype]
    values = dict(values)
    groups: dict[tuple[int, int], list[str]] = {}
    for name, (group, vals) in (reference or {}).items():
        values[name] = vals
        groups.setdefault(group, []).append(name)
    for name in values:
        if name in results:
            groups.setdefault(entry_group(results[name]), []).append(name)
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
            details.append(f"{ref}: loss {r_loss:.6f} (nothing to compare at {n[0]} pairs/step, "
                           f"{n[1]} rejected/prompt)")
    return {"ok": bool(ok), "rtol": rtol, "tolerance": f"relative {rtol:g} ({str(dtype).replace('torch.', '')})",
            "compared": "loss and per-pair mean chosen/rejected log-probs, per (pairs/step, rejected/prompt) group",
            "max_rel_err": worst, "details": details}


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def format_table(report: dict) -> str:
    dev = report["device"]
    head = (f"{_family(report)} {report['config']['size']} on {dev.get('name')} ({dev['type']}), "
            f"{report['config']['dtype']}, "
            f"grad_ckpt={report['config']['grad_checkpointing']}, compile={report['config']['compile']}, "
            f"{report['config']['steps']} timed steps")
    cols = ["variant", "pairs/step", "rejected/prompt", "median s", "pairs/s", "tokens/s", "tokens/step", "MFU",
            "peak GiB", "loss", "vs plain"]
    rows = []
    for name, r in report["variants"].items():
        n, k = map(str, entry_group(r))
        if r.get("skipped"):
            rows.append([name, n, k, "skipped", "", "", _fmt(r.get("tokens_per_step"), "d"), "",
                         "", _fmt(r.get("loss"), ".5f"), ""])
            continue
        rows.append([
            name, n, k, _fmt(r["median_s"], ".4f"), _fmt(r["pairs_per_s"], ".2f"),
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


def _family(rep: dict) -> str:
    """A report's family (files from before --family are LLaVA-NeXT)."""
    return rep["config"].get("family", "llava_next")


def _entry_gc(rep: dict, v: dict) -> bool:
    """Whether an entry ran with grad ckpt (older files recorded it only in the config)."""
    return bool(v.get("grad_checkpointing", rep["config"].get("grad_checkpointing") in (True, "on")))


def summarize(paths: list[str]) -> str:
    """One markdown table over several result files (e.g. everything gpu_run.sh wrote).

    "vs eager plain" compares with the uncompiled plain variant at the same pairs/step, rejected/prompt and
    grad-ckpt setting,
    from any of the files measured on the same device name.
    """
    reports = []
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {p}: {exc}", file=sys.stderr)
            continue
        # a --family run of several families holds one report per family
        reports += [(f"{p}:{f}", r) for f, r in rep["families"].items()] if "families" in rep else [(p, rep)]
    eager_plain = {}
    for _, rep in reports:
        if rep["config"].get("compile"):
            continue
        for v in rep["variants"].values():
            if v.get("base") == "plain" and v.get("median_s"):
                key = (rep["device"].get("name"), _family(rep), rep["config"]["size"], *entry_group(v),
                       _entry_gc(rep, v))
                eager_plain[key] = v
    cols = ["file", "family", "variant", "pairs/step", "rejected/prompt", "grad ckpt", "compile", "median s",
            "pairs/s", "MFU", "peak GiB", "loss", "vs eager plain", "mem vs eager plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for path, rep in reports:
        c = rep["config"]
        for name, v in rep["variants"].items():
            gc_on = _entry_gc(rep, v)
            ref = eager_plain.get((rep["device"].get("name"), _family(rep), c["size"], *entry_group(v), gc_on))
            speed = ref["median_s"] / v["median_s"] if ref and v.get("median_s") else None
            mem = v["peak_gib"] / ref["peak_gib"] if ref and v.get("peak_gib") and ref.get("peak_gib") else None
            lines.append("| " + " | ".join([
                Path(path).name, _family(rep), name, *map(str, entry_group(v)), "on" if gc_on else "off",
                str(c["compile"]),
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


def family_table(combined: dict) -> str:
    """One markdown row per family and (pairs/step, rejected/prompt, grad ckpt) of a several-family run: the median
    step of plain and of each packed variant that ran, tokens per step, and plain's time over packed's."""
    packed = ("packed_sdpa", "packed_pairs", "packed_flex")
    cols = ["family", "pairs/step", "image tokens", "tokens/step plain / packed", "plain s", "packed s", "vs plain",
            "losses"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for family, rep in combined["families"].items():
        groups: dict[tuple, dict[str, dict]] = {}
        for v in rep["variants"].values():
            groups.setdefault((*entry_group(v), _entry_gc(rep, v)), {})[v["base"]] = v
        for (n, k, gc_on), by_base in groups.items():
            plain = by_base.get("plain", {}).get("median_s")
            ran = [b for b in packed if by_base.get(b, {}).get("median_s")]
            tokens = dict.fromkeys(by_base[b]["tokens_per_step"] for b in ("plain", *ran) if b in by_base)
            lines.append("| " + " | ".join([
                family, f"{n}" + (f", {k} rejected" if k > 1 else "") + (", grad ckpt" if gc_on else ""),
                str(rep["config"]["image_tokens"]), " / ".join(map(str, tokens)), _fmt(plain, ".4f"),
                " / ".join(f"{by_base[b]['median_s']:.4f} ({b.removeprefix('packed_')})" for b in ran),
                " / ".join(f"{plain / by_base[b]['median_s']:.2f}x" for b in ran) if plain else "-",
                "agree" if rep["loss_check"]["ok"] else "MISMATCH",
            ]) + " |")
    return "\n".join(lines)
