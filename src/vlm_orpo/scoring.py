"""Score preference pairs with the packed forward: per-pair log-probs and ORPO terms, and their summary.

Training's validation and `vlm-orpo evaluate` both use this, so there is one implementation of the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_orpo.losses import orpo_terms
from vlm_orpo.modeling.shared_prefix import packed_logps

PER_PAIR_FIELDS = ("chosen_logp", "rejected_logp", "log_odds", "sft_loss", "or_loss")


@dataclass
class PairScores:
    """Per-pair values, in dataset order, as 1D float tensors on CPU."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)  # idx and token ids per pair (single process only)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def summary(self, orpo_lambda: float) -> dict[str, float]:
        """The results-table columns: ORPO/SFT/OR loss, preference accuracy, reward margin, log-odds."""
        v = self.values
        if not v:
            raise ValueError("no pairs were scored")
        margin = v["chosen_logp"] - v["rejected_logp"]
        return {
            "loss": (v["sft_loss"] + orpo_lambda * v["or_loss"]).mean().item(),
            "sft_loss": v["sft_loss"].mean().item(),
            "or_loss": v["or_loss"].mean().item(),
            "accuracy": (margin > 0).float().mean().item(),
            "reward_margin": (orpo_lambda * margin).mean().item(),
            "log_odds": v["log_odds"].mean().item(),
            "logps_chosen": v["chosen_logp"].mean().item(),
            "logps_rejected": v["rejected_logp"].mean().item(),
            "pairs": float(len(self)),
        }


def score_batch(model, batch: dict, backend: str, orpo_lambda: float, sft_on_prompt: bool) -> dict[str, torch.Tensor]:
    logps = packed_logps(model, batch, backend)
    terms = orpo_terms(logps, orpo_lambda, sft_on_prompt)
    return {
        "chosen_logp": logps.chosen,
        "rejected_logp": logps.rejected,
        "log_odds": terms.log_odds,
        "sft_loss": terms.sft_loss,
        "or_loss": terms.or_loss,
    }


@torch.no_grad()
def score_batches(model, batches, backend: str, orpo_lambda: float, sft_on_prompt: bool = False, gather=None):
    """Score an iterable of packed batches; `gather` (e.g. accelerate's gather_for_metrics) joins processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PER_PAIR_FIELDS}
    meta: list[dict] = []
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if gather is None:
                meta.extend(batch.get("meta", []))
            scores = score_batch(model, batch, backend, orpo_lambda, sft_on_prompt)
            for name, value in scores.items():
                value = value.float()
                parts[name].append((gather(value) if gather else value).cpu())
    finally:
        model.train(was_training)
    return PairScores({name: torch.cat(chunks) for name, chunks in parts.items() if chunks}, meta)
