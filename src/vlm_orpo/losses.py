"""Preference losses as functions of per-pair mean log-probs.

The forward pass only produces log-probs (see `modeling.shared_prefix`); every loss lives here, so SimPO, CPO
or DPO can be added without touching the forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A mean log-prob of exactly 0 (every answer token certain) makes log(1 - p) = -inf. Clamping just below 0
# keeps the loss and its gradient finite; it changes the value only when p > 0.999999.
_MAX_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012) and NaN-free in backward."""
    x = x.clamp(max=_MAX_LOGP)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairLogps:
    """Summed answer log-probs and token counts per pair; means are derived."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    prompt_sum: torch.Tensor | None = None  # log-probs of the prompt's text tokens (for sft_on_prompt)
    prompt_tokens: torch.Tensor | None = None

    @property
    def chosen(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_tokens

    @property
    def rejected(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens

    def sft_nll(self, include_prompt: bool = False) -> torch.Tensor:
        """Mean per-token negative log-likelihood of the chosen answer (optionally with the prompt's text)."""
        if not include_prompt:
            return -self.chosen
        if self.prompt_sum is None:
            raise ValueError("sft_on_prompt needs the prompt's text log-probs; build the batch with sft_on_prompt=True")
        return -(self.chosen_sum + self.prompt_sum) / (self.chosen_tokens + self.prompt_tokens)


@dataclass
class OrpoTerms:
    """Per-pair ORPO terms, shape [num_pairs] each."""

    log_odds: torch.Tensor
    or_loss: torch.Tensor
    sft_loss: torch.Tensor
    loss: torch.Tensor


def orpo_terms(logps: PairLogps, orpo_lambda: float, sft_on_prompt: bool = False) -> OrpoTerms:
    """ORPO (Hong et al. 2024): loss = sft + lambda * -logsigmoid(log odds(chosen) - log odds(rejected))."""
    chosen, rejected = logps.chosen, logps.rejected
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    or_loss = -F.logsigmoid(log_odds)
    sft_loss = logps.sft_nll(sft_on_prompt)
    return OrpoTerms(log_odds=log_odds, or_loss=or_loss, sft_loss=sft_loss, loss=sft_loss + orpo_lambda * or_loss)


def orpo_metrics(logps: PairLogps, terms: OrpoTerms, orpo_lambda: float) -> dict[str, float]:
    """Batch means under TRL's ORPOTrainer names (rewards are lambda * mean log-prob, as TRL's beta)."""
    chosen_rewards = orpo_lambda * logps.chosen.detach()
    rejected_rewards = orpo_lambda * logps.rejected.detach()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (logps.chosen > logps.rejected).float().mean().item(),  # also right at lambda 0
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": logps.chosen.detach().mean().item(),
        "logps/rejected": logps.rejected.detach().mean().item(),
        "nll_loss": terms.sft_loss.detach().mean().item(),
        "or_loss": terms.or_loss.detach().mean().item(),
        "log_odds_ratio": (-terms.or_loss.detach()).mean().item(),
        "log_odds_chosen": terms.log_odds.detach().mean().item(),
    }
