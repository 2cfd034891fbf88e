"""Preference losses as functions of per-pair log-probs, and their metrics under TRL's names.

The forward pass only produces log-probs (see `modeling.shared_prefix`); every loss lives here, so SimPO, CPO
or DPO can be added without touching the forward. `pair_losses` is the one place that turns log-probs into the
loss and every metric, per pair: training logs their batch means, evaluation their dataset means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm_orpo.config import LossConfig

# A mean log-prob of exactly 0 (every answer token certain) makes log(1 - p) = -inf. Clamping just below 0
# keeps the loss and its gradient finite; it changes the value only when p > 0.999999.
_MAX_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012) and NaN-free in backward."""
    x = x.clamp(max=_MAX_LOGP)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairLogps:
    """Summed answer log-probs and token counts per pair; means are derived.

    `prompt_sum` is set when the batch scored the prompt's text tokens (the collator's `sft_on_prompt`); the
    NLL term then includes them, as TRL's does."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    prompt_sum: torch.Tensor | None = None
    prompt_tokens: torch.Tensor | None = None

    @property
    def chosen(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_tokens

    @property
    def rejected(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens

    def sft_nll(self) -> torch.Tensor:
        """Mean per-token negative log-likelihood of the chosen answer, with the prompt's text if it was scored."""
        if self.prompt_sum is None:
            return -self.chosen
        return -(self.chosen_sum + self.prompt_sum) / (self.chosen_tokens + self.prompt_tokens)


def orpo_log_odds(logps: PairLogps) -> torch.Tensor:
    """log odds(chosen) - log odds(rejected) of the mean per-token probabilities (Hong et al. 2024)."""
    chosen, rejected = logps.chosen, logps.rejected
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def pair_losses(logps: PairLogps, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Per-pair `loss` (with its graph) and metrics (detached), shape [num_pairs] each, under TRL's names.

    ORPO: loss = nll + lambda * -logsigmoid(log odds ratio); rewards are lambda * mean log-prob, as in TRL."""
    lam = loss_cfg.orpo_lambda
    log_odds = orpo_log_odds(logps)
    or_loss = -F.logsigmoid(log_odds)
    nll = logps.sft_nll()
    chosen, rejected = logps.chosen.detach(), logps.rejected.detach()
    return {
        "loss": nll + lam * or_loss,
        "nll_loss": nll.detach(),
        "or_loss": or_loss.detach(),
        "log_odds_ratio": -or_loss.detach(),
        "log_odds_chosen": log_odds.detach(),
        "rewards/chosen": lam * chosen,
        "rewards/rejected": lam * rejected,
        "rewards/margins": lam * (chosen - rejected),
        "rewards/accuracies": (chosen > rejected).float(),  # also right at lambda 0
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
