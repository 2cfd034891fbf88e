"""Preference losses as functions of per-pair log-probs (and a reference's), and their metrics under TRL's names.

The forward pass only produces log-probs (see `modeling.shared_prefix`); every loss lives here, written as TRL
writes it: ORPO (ORPOTrainer), SimPO and CPO (CPOTrainer.cpo_loss), and the DPO family (DPOTrainer._compute_loss:
sigmoid, ipo, hinge, robust, apo_zero, sigmoid_norm). `pair_losses` is the one place that turns log-probs into
the loss and every metric, per pair: training logs their batch means, evaluation their dataset means.

Normalisation follows TRL: the DPO family and CPO use summed answer log-probs (IPO and sigmoid_norm divide the
log-ratios by the answer lengths), SimPO and ORPO use the mean per token. The NLL term (ORPO's SFT term, CPO's
`cpo_alpha`, RPO's `sft_weight`) is each pair's mean per-token NLL of chosen; TRL takes the token mean over the
whole batch, which differs only in how pairs of different lengths are weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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


def dpo_sigmoid(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPOTrainer loss_type "sigmoid" (DPO): -logsigmoid(beta * delta), delta = chosen - rejected log-ratio."""
    return -F.logsigmoid(beta * delta)


def dpo_hinge(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPOTrainer loss_type "hinge" (SLiC): relu(1 - beta * delta)."""
    return torch.relu(1 - beta * delta)


def dpo_ipo(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """DPOTrainer loss_type "ipo": (delta - 1 / (2 beta))^2 on log-ratios divided by answer length (beta is tau)."""
    return (delta_per_token - 1 / (2 * beta)) ** 2


def dpo_robust(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPOTrainer loss_type "robust" (rDPO): unbiased under a rate `label_smoothing` of flipped labels."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def apo_zero(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """DPOTrainer loss_type "apo_zero" (APO eq. 7): raise chosen, lower rejected, each against the reference."""
    return (1 - torch.sigmoid(beta * chosen_logratio)) + torch.sigmoid(beta * rejected_logratio)


def smoothed_sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """CPOTrainer.cpo_loss "sigmoid"/"simpo": -logsigmoid(beta x) (1 - eps) - logsigmoid(-beta x) eps."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


class _Terms(NamedTuple):
    """A loss's preference term per pair, its scores (reward = scale * score) and the log-probs TRL logs."""

    loss: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    scale: float
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor
    extra: dict[str, torch.Tensor]


def _preference_terms(logps: PairLogps, cfg: LossConfig, ref: PairLogps | None) -> _Terms:
    """The rewards are as TRL logs them: ORPO lambda * mean log-prob, SimPO beta * mean log-prob, CPO beta *
    summed log-prob, the DPO family beta * summed log-ratio against the reference."""
    kind = cfg.type
    if kind == "orpo":
        log_odds = orpo_log_odds(logps)
        or_loss = -F.logsigmoid(log_odds)
        extra = {"or_loss": or_loss, "log_odds_ratio": -or_loss, "log_odds_chosen": log_odds}
        chosen, rejected = logps.chosen, logps.rejected
        return _Terms(cfg.orpo_lambda * or_loss, chosen, rejected, cfg.orpo_lambda, chosen, rejected, extra)
    if kind == "simpo":
        chosen, rejected = logps.chosen, logps.rejected
        loss = smoothed_sigmoid((chosen - rejected) - cfg.simpo_gamma / cfg.beta, cfg.beta, cfg.label_smoothing)
        return _Terms(loss, chosen, rejected, cfg.beta, chosen, rejected, {})
    if kind == "cpo":
        chosen, rejected = logps.chosen_sum, logps.rejected_sum
        loss = smoothed_sigmoid(chosen - rejected, cfg.beta, cfg.label_smoothing)
        return _Terms(loss, chosen, rejected, cfg.beta, chosen, rejected, {})
    if ref is None:
        raise ValueError(f"loss.type {kind} needs the reference model's log-probs")
    chosen = logps.chosen_sum - ref.chosen_sum
    rejected = logps.rejected_sum - ref.rejected_sum
    delta = chosen - rejected
    if kind in ("ipo", "sigmoid_norm"):  # TRL divides each log-ratio by its answer's length
        delta = chosen / logps.chosen_tokens.clamp(min=1) - rejected / logps.rejected_tokens.clamp(min=1)
    if kind in ("dpo", "sigmoid_norm"):
        loss = dpo_sigmoid(delta, cfg.beta)
    elif kind == "hinge":
        loss = dpo_hinge(delta, cfg.beta)
    elif kind == "ipo":
        loss = dpo_ipo(delta, cfg.beta)
    elif kind == "robust":
        loss = dpo_robust(delta, cfg.beta, cfg.label_smoothing)
    else:
        loss = apo_zero(chosen, rejected, cfg.beta)
    extra = {"logps/ref_chosen": ref.chosen_sum, "logps/ref_rejected": ref.rejected_sum}
    return _Terms(loss, chosen, rejected, cfg.beta, logps.chosen_sum, logps.rejected_sum, extra)


def pair_losses(logps: PairLogps, loss_cfg: LossConfig, ref: PairLogps | None = None) -> dict[str, torch.Tensor]:
    """Per-pair `loss` (with its graph) and metrics (detached), shape [num_pairs] each, under TRL's names.

    `ref` holds the reference model's log-probs of the same pairs; only the DPO family reads it. The loss is the
    preference term plus `loss_cfg.nll_weight` times the NLL of chosen (ORPO: nll + lambda * odds-ratio term)."""
    terms = _preference_terms(logps, loss_cfg, ref)
    loss, metrics = terms.loss, {}
    if loss_cfg.nll_weight:
        nll = logps.sft_nll()
        loss = loss + loss_cfg.nll_weight * nll
        metrics["nll_loss"] = nll
    chosen, rejected, scale = terms.chosen.detach(), terms.rejected.detach(), terms.scale
    metrics |= {
        **terms.extra,
        "rewards/chosen": scale * chosen,
        "rewards/rejected": scale * rejected,
        "rewards/margins": scale * (chosen - rejected),
        "rewards/accuracies": (chosen > rejected).float(),  # the scores, not the rewards: also right at scale 0
        "logps/chosen": terms.logps_chosen,
        "logps/rejected": terms.logps_rejected,
    }
    return {"loss": loss, **{name: value.detach() for name, value in metrics.items()}}
