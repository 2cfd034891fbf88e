"""Score preference pairs with the packed forward: per-pair loss and metrics, and their dataset means.

Training's validation and `vlm-orpo evaluate` both use this, and the metrics come from `losses.pair_losses`, the
same function as the training loss, so every number has one definition and one name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_orpo.config import LossConfig
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.forward import pair_logps
from vlm_orpo.data.packing import move_batch
from vlm_orpo.reference import reference_for


@dataclass
class PairScores:
    """Per-pair metrics (TRL's names), in dataset order, as 1D float tensors on CPU."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)  # idx and token ids per pair (single process only)
    # mean per-token log-prob of each answer, whatever the loss sums or averages: the per-pair file's contract
    answer_logps: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def means(self) -> dict[str, float]:
        """Dataset means of every metric, plus the number of pairs."""
        if not self.values:
            raise ValueError("no pairs were scored")
        return {**{name: v.mean().item() for name, v in self.values.items()}, "pairs": float(len(self))}


def gathered_pairs(accelerator, value: torch.Tensor, pairs_per_group: torch.Tensor) -> torch.Tensor:
    """One batch's per-pair values from every process, in order, each dataset row's pairs once.

    accelerate's `gather_for_metrics` drops the rows it repeated to even out the last batch by cutting the
    gathered dim 0 to the rows left, so it must see one entry per row (a prompt with k rejected answers has k
    pairs): the values go as [rows, most rejected answers], padded across processes, with a mask of real pairs."""
    counts = pairs_per_group.to(value.device)
    real = torch.arange(int(counts.max()), device=value.device) < counts[:, None]
    by_row = value.new_zeros(real.shape).masked_scatter(real, value)
    by_row, real = (accelerator.gather_for_metrics(accelerator.pad_across_processes(t, dim=1))
                    for t in (by_row, real.long()))
    return by_row[real.bool()]


@torch.no_grad()
def score_batches(model, batches, loss_cfg: LossConfig, accelerator=None, reference=None) -> PairScores:
    """Score an iterable of packed batches; `accelerator` (the trainer's) joins processes (`gathered_pairs`).

    A loss with a reference scores it too: `reference` (the trainer's), else the one `model` implies (a PEFT
    model with its adapter disabled, `loss.reference_model`, or a plain model itself)."""
    if reference is None:
        reference = reference_for(model, loss_cfg)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    meta: list[dict] = []
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            if accelerator is None:
                meta.extend(batch.get("meta", []))
            ref = reference.logps(model, batch) if reference is not None else None
            logps = pair_logps(model, batch)
            per_pair = {**pair_losses(logps, loss_cfg, ref), "answer:chosen": logps.chosen, "answer:rejected": logps.rejected}
            for name, value in per_pair.items():
                value = value.float()
                if accelerator is not None:
                    value = gathered_pairs(accelerator, value, batch["pairs_per_group"])
                parts.setdefault(name, []).append(value.cpu())
    finally:
        model.train(was_training)
    values = {name: torch.cat(chunks) for name, chunks in parts.items()}
    answer_logps = {name.removeprefix("answer:"): values.pop(name) for name in list(values) if name.startswith("answer:")}
    return PairScores(values, meta, answer_logps)
