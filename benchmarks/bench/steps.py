"""The timed step: each variant's inputs prepared (and moved to the device) before timing, then forward +
backward of the mean loss (ORPO; or DPO with its reference: a forward without grad and the adapter disabled, in the
step, or precomputed before timing), timed with the device synchronised around every step."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from vlm_orpo.config import LossConfig
from vlm_orpo.data.packing import EncodedPair, PackedCollator, PlainCollator
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.plain import plain_logps, plain_pair_logps
from vlm_orpo.modeling.shared_prefix import packed_logps, unwrap
from vlm_orpo.reference import AdapterDisabled

from .flops import packed_work, plain_work

BASE_VARIANTS = ("plain", "packed_sdpa", "packed_pairs", "packed_flex")
LOSSES = {"orpo": LossConfig(type="orpo", orpo_lambda=0.1), "dpo": LossConfig(type="dpo", beta=0.1)}
REFERENCES = ("none", "live", "precomputed")  # the DPO reference: none (ORPO), in the step, or before timing


@dataclass(frozen=True)
class Variant:
    """What to measure: a base variant at a number of prompts per step, each with k rejected answers (k pairs),
    with or without grad checkpointing."""

    name: str
    base: str  # plain | packed_sdpa | packed_pairs | packed_flex
    n_pairs: int  # prompts per step (pairs, at one rejected answer per prompt)
    grad_checkpointing: bool
    rejected_per_prompt: int = 1
    reference: str = "none"  # one of REFERENCES

    @property
    def group(self) -> tuple[int, int]:
        """Variants of one group run the same pairs: their losses must agree, and plain's median is the speed-up's."""
        return self.n_pairs, self.rejected_per_prompt


def backend_of(base: str) -> str:
    """The attention backend a base variant runs under: plain's sequences take SDPA's own causal mask."""
    return "sdpa" if base == "plain" else base.removeprefix("packed_")


@dataclass
class Step:
    """A variant's inputs, on the device: `compute()` runs the forward and returns its PairLogps; `reference()`
    the reference's PairLogps (None without one)."""

    compute: object
    work: dict  # what the step executes, for the FLOP formula (`flops.plain_work`, `flops.packed_work`)
    backend: str
    loss: LossConfig
    reference: object = lambda: None


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        elif isinstance(v, dict):  # the packed batch nests its image tensors under "images"
            v = to_device(v, device, dtype)
        out[k] = v
    return out


def prepare_step(model, base: str, pairs: list[EncodedPair], device, dtype, pad_id: int, image_id: int,
                 reference: str = "none") -> Step:
    """Plain: `modeling.plain`'s k + 1 sequences per prompt with full logits (TRL's layout); packed: all prompts
    with all their answers in one shared-prefix row (the model holds the attention backend, set by the caller from
    `Step.backend`). With a reference (DPO), the reference runs on the same layout with the adapter disabled: in
    every step ("live", as TRL's policy + reference forwards), or once here ("precomputed")."""
    if base == "plain":
        batch = to_device(PlainCollator(pad_id, image_id, keep_all_logits=True)(pairs), device, dtype)
        step = Step(lambda: plain_logps(model, batch), plain_work(pairs), backend_of(base), LOSSES["orpo"])
    else:
        collator = PackedCollator(pad_id, image_id, max_tokens_per_row=sum(len(p) for p in pairs))
        batch = collator(pairs)
        assert batch["input_ids"].shape[0] == 1, "all pairs of a step must share one row"
        work = packed_work(pairs, batch)
        batch = to_device(batch, device, dtype)
        step = Step(lambda: packed_logps(model, batch), work, backend_of(base), LOSSES["orpo"])
    if reference == "none":
        return step
    live = lambda: AdapterDisabled(model).logps(model, batch)  # noqa: E731 - pair_logps reads the batch's layout
    if reference == "precomputed":
        from vlm_orpo.modeling.shared_prefix import set_attention_backend

        set_attention_backend(model, step.backend)
        cached = live()
        live = lambda: cached  # noqa: E731
    return Step(step.compute, step.work, step.backend, LOSSES["dpo"], live)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_loss(logps, loss: LossConfig, ref=None) -> torch.Tensor:
    return pair_losses(logps, loss, ref)["loss"].mean()


def loss_values(loss: torch.Tensor, logps) -> tuple:
    """(loss, per-pair mean chosen log-probs, rejected), on the CPU in fp32: what the loss check compares."""
    return loss.float().item(), logps.chosen.detach().float().cpu(), logps.rejected.detach().float().cpu()


def train_step(model, step: Step):
    model.zero_grad(set_to_none=True)
    logps = step.compute()
    loss = mean_loss(logps, step.loss, step.reference())
    loss.backward()
    return loss.detach(), logps


def time_step(model, step: Step, device, warmup: int, steps: int):
    """(step times in s, loss values of the first step)."""
    values = loss_values(*train_step(model, step))  # first step: compile/autotune, and the values we compare
    for _ in range(max(warmup - 1, 0)):
        train_step(model, step)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, step)
        sync(device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times, values


def forward_only_values(step: Step) -> tuple:
    """Loss values of a step without a backward (variants with no backward here, and the oracle)."""
    with torch.no_grad():
        logps = step.compute()
        return loss_values(mean_loss(logps, step.loss, step.reference()), logps)


def reference_values(model, pairs: list[EncodedPair], pad_id: int, loss: str = "orpo") -> tuple:
    """Loss values from `modeling.plain.plain_pair_logps` itself, the oracle of the tests, for the loss check (DPO:
    its reference too, with the adapter disabled)."""
    def reference():
        with model.disable_adapter():
            return plain_pair_logps(model, pairs, pad_id)

    oracle = Step(lambda: plain_pair_logps(model, pairs, pad_id), {}, "sdpa", LOSSES[loss],
                  reference if loss == "dpo" else lambda: None)
    return forward_only_values(oracle)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_grad_checkpointing(model, on: bool):
    """Non-reentrant gradient checkpointing on or off; only on a change, as each enable adds an input hook."""
    if unwrap(model).is_gradient_checkpointing != on:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    model.train()
