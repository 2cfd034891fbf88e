"""Score preference pairs with the packed forward: per-pair loss and metrics, and their dataset means.

Training's validation and `vlm-orpo evaluate` both use this, and the metrics come from `losses.pair_losses`, the
same function as the training loss, so every number has one definition and one name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_orpo.config import LossConfig
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.shared_prefix import packed_logps


@dataclass
class PairScores:
    """Per-pair metrics (TRL's names), in dataset order, as 1D float tensors on CPU."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)  # idx and token ids per pair (single process only)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def means(self) -> dict[str, float]:
        """Dataset means of every metric, plus the number of pairs."""
        if not self.values:
            raise ValueError("no pairs were scored")
        return {**{name: v.mean().item() for name, v in self.values.items()}, "pairs": float(len(self))}


def move_batch(batch: dict, device: torch.device) -> dict:
    """The packed batch on `device`: its tensors, and the image tensors nested under `images`."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    moved["images"] = {k: v.to(device) for k, v in batch["images"].items()}
    return moved


@torch.no_grad()
def score_batches(model, batches, loss_cfg: LossConfig, gather=None) -> PairScores:
    """Score an iterable of packed batches; `gather` (e.g. accelerate's gather_for_metrics) joins processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    meta: list[dict] = []
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            if gather is None:
                meta.extend(batch.get("meta", []))
            for name, value in pair_losses(packed_logps(model, batch), loss_cfg).items():
                value = value.float()
                parts.setdefault(name, []).append((gather(value) if gather else value).cpu())
    finally:
        model.train(was_training)
    return PairScores({name: torch.cat(chunks) for name, chunks in parts.items()}, meta)
