"""The timed step: each variant's inputs prepared (and moved to the device) before timing, then forward +
backward of the mean ORPO loss, timed with the device synchronised around every step."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from vlm_orpo.config import LossConfig
from vlm_orpo.data.packing import EncodedPair, PackedCollator
from vlm_orpo.losses import PairLogps, pair_losses
from vlm_orpo.modeling.reference import plain_batch, plain_logps
from vlm_orpo.modeling.shared_prefix import packed_logps, token_logps, unwrap

from .flops import packed_work, plain_work

BASE_VARIANTS = ("plain", "packed_sdpa", "packed_flex")
LOSS = LossConfig(type="orpo", orpo_lambda=0.1)


@dataclass(frozen=True)
class Variant:
    """What to measure: a base variant at a number of pairs per step, with or without grad checkpointing."""

    name: str
    base: str  # plain | packed_sdpa | packed_flex
    n_pairs: int
    grad_checkpointing: bool


@dataclass
class Step:
    """A variant's inputs, on the device: `compute()` runs the forward and returns its PairLogps."""

    compute: object
    work: dict  # what the step executes, for the FLOP formula (`flops.plain_work`, `flops.packed_work`)
    backend: str


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
    logits = model(**batch, use_cache=False).logits  # [2N, width, vocab]
    logps = token_logps(logits[targets["rows"], targets["cols"]], targets["ids"])
    n_seq = targets["lengths"].numel()
    sums = torch.zeros(n_seq, dtype=logps.dtype, device=logps.device).index_add(0, targets["rows"], logps)
    sums, lengths = sums.view(2, -1), targets["lengths"].to(logps.device, logps.dtype).view(2, -1)
    return PairLogps(chosen_sum=sums[0], rejected_sum=sums[1], chosen_tokens=lengths[0], rejected_tokens=lengths[1])


def prepare_step(model, base: str, pairs: list[EncodedPair], device, dtype, pad_id: int, image_id: int) -> Step:
    """Plain: two sequences per pair with full logits (TRL's layout, `plain_step_logps`); packed: all pairs
    in one shared-prefix row (the model holds the attention backend, set by the caller from `Step.backend`)."""
    if base == "plain":
        batch, spans = plain_batch(pairs, pad_id)
        targets = to_device(plain_targets(batch, spans), device, torch.float32)
        batch = to_device(batch, device, dtype)
        return Step(lambda: plain_step_logps(model, batch, targets), plain_work(pairs), "sdpa")
    collator = PackedCollator(pad_id, image_id, max_tokens_per_row=sum(len(p) for p in pairs))
    batch = collator(pairs)
    assert batch["input_ids"].shape[0] == 1, "all pairs of a step must share one row"
    work = packed_work(pairs, batch)
    batch = to_device(batch, device, dtype)
    return Step(lambda: packed_logps(model, batch), work, "flex" if base == "packed_flex" else "sdpa")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_loss(logps) -> torch.Tensor:
    return pair_losses(logps, LOSS)["loss"].mean()


def loss_values(loss: torch.Tensor, logps) -> tuple:
    """(loss, per-pair mean chosen log-probs, rejected), on the CPU in fp32: what the loss check compares."""
    return loss.float().item(), logps.chosen.detach().float().cpu(), logps.rejected.detach().float().cpu()


def train_step(model, step: Step):
    model.zero_grad(set_to_none=True)
    logps = step.compute()
    loss = mean_loss(logps)
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


def forward_only_values(compute) -> tuple:
    """Loss values of `compute()` without a backward (variants with no backward here, and the reference)."""
    with torch.no_grad():
        logps = compute()
        return loss_values(mean_loss(logps), logps)


def reference_values(model, pairs: list[EncodedPair], pad_id: int) -> tuple:
    """Loss values from `modeling.reference.plain_logps` itself, the oracle of the tests, for the loss check."""
    return forward_only_values(lambda: plain_logps(model, pairs, pad_id))


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
