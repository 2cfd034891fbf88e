"""ORPO loss against TRL's formula written out, stability near log-prob 0, and TRL metric names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm_orpo.config import LossConfig
from vlm_orpo.losses import PairLogps, log1mexp, pair_losses


def orpo(logps, lam):
    return pair_losses(logps, LossConfig(orpo_lambda=lam))


def logps_from_means(chosen, rejected, tokens=(5.0, 7.0)):
    n = len(chosen)
    ct, rt = torch.full((n,), tokens[0]), torch.full((n,), tokens[1])
    return PairLogps(torch.tensor(chosen) * ct, torch.tensor(rejected) * rt, ct, rt)


def trl_orpo(chosen, rejected, beta):
    """TRL ORPOTrainer.odds_ratio_loss and its nll term, as written in TRL (answer-only NLL per pair)."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    return -chosen - beta * ratio, log_odds, ratio


def test_matches_trl_formula():
    chosen = [-0.3, -1.2, -2.5, -0.05]
    rejected = [-0.9, -0.4, -2.6, -3.0]
    for lam in (0.1, 1.0, 10.0):
        terms = orpo(logps_from_means(chosen, rejected), lam)
        want, log_odds, ratio = trl_orpo(torch.tensor(chosen), torch.tensor(rejected), lam)
        torch.testing.assert_close(terms["loss"], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(terms["log_odds_chosen"], log_odds, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(terms["log_odds_ratio"], ratio, rtol=1e-6, atol=1e-6)


def test_log1mexp_accurate_at_both_ends():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    values = [-1e-5, -1e-3, -0.5, -0.7, -5.0, -40.0]
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(v))) for v in values], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(torch.tensor(values, dtype=torch.float64)), want, rtol=1e-12, atol=0)


def test_confident_answers_give_finite_loss_and_gradients():
    for values in ([0.0, 0.0], [-1e-9, 0.0], [0.0, -1e-12], [-1e-7, -80.0]):
        chosen = torch.tensor([values[0]], requires_grad=True)
        rejected = torch.tensor([values[1]], requires_grad=True)
        logps = PairLogps(chosen * 3, rejected * 4, torch.tensor([3.0]), torch.tensor([4.0]))
        loss = orpo(logps, 10.0)["loss"].sum()
        loss.backward()
        assert torch.isfinite(loss), values
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all(), values


def test_the_nll_term_adds_the_prompt_tokens_exactly_when_the_batch_scored_them():
    answers = PairLogps(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2.0]), torch.tensor([2.0]))
    assert orpo(answers, 0.0)["nll_loss"].item() == 2.0
    with_prompt = PairLogps(**{**answers.__dict__, "prompt_sum": torch.tensor([-2.0]), "prompt_tokens": torch.tensor([2.0])})
    assert orpo(with_prompt, 0.0)["nll_loss"].item() == 1.5


def test_metrics_use_trl_names_and_values():
    logps = logps_from_means([-0.5, -2.0], [-1.0, -1.5])
    metrics = {k: v.mean().item() for k, v in orpo(logps, 0.1).items()}
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "nll_loss", "or_loss", "log_odds_ratio",
                            "log_odds_chosen"}
    assert metrics["rewards/accuracies"] == 0.5
    assert abs(metrics["rewards/margins"] - 0.1 * ((0.5 + -0.5) / 2)) < 1e-7
    assert abs(metrics["nll_loss"] - 1.25) < 1e-6
    assert abs(metrics["loss"] - (metrics["nll_loss"] + 0.1 * metrics["or_loss"])) < 1e-6


def test_accuracy_compares_log_probs_even_at_lambda_zero():
    logps = logps_from_means([-0.5, -2.0, -0.1], [-1.0, -1.5, -0.9])
    assert orpo(logps, 0.0)["rewards/accuracies"].mean().item() == pytest.approx(2 / 3)
