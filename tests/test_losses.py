"""Every loss against TRL's code written out (value, gradient, rewards), stability at the extremes, TRL metric
names, the loss knobs' checks, and the results table of each loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm_orpo.config import LOSS_TYPES, LossConfig
from vlm_orpo.errors import ConfigError
from vlm_orpo.losses import PairLogps, log1mexp, pair_losses
from vlm_orpo.reporting import curves, results_table


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


# ---- The other losses, against TRL 1.16.0's code written out (f_divergence_type "reverse_kl", no WPO weighting).

BETA, SMOOTHING, GAMMA, ALPHA = 0.3, 0.2, 0.7, 1.5
DPO_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "apo_zero": "apo_zero",
             "sigmoid_norm": "sigmoid_norm"}  # our loss.type -> TRL's DPOConfig.loss_type


def trl_dpo(loss_type, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len,
            beta, label_smoothing):
    """trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss: summed log-probs; IPO and sigmoid_norm divide the
    log-ratios by completion_mask.sum(dim=1).clamp(min=1.0). Returns (per_sequence_loss, chosen_rewards,
    rejected_rewards)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        chosen_avg_score = chosen_scores / chosen_len.clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_len.clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    elif loss_type == "apo_zero":
        losses_chosen = 1 - torch.sigmoid(beta * chosen_logratios)
        losses_rejected = torch.sigmoid(beta * rejected_logratios)
        per_sequence_loss = losses_chosen + losses_rejected
    elif loss_type == "sigmoid_norm":
        chosen_avg_score = chosen_scores / chosen_len.clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_len.clamp(min=1.0)
        delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = -F.logsigmoid(beta * delta)
    return per_sequence_loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def trl_cpo(loss_type, chosen_sum, rejected_sum, chosen_len, rejected_len, beta, label_smoothing, simpo_gamma,
            cpo_alpha):
    """trl/experimental/cpo/cpo_trainer.py, CPOTrainer.concatenated_forward (average_log_prob for "simpo"; nll_loss
    is CrossEntropyLoss over the batch's chosen tokens), cpo_loss (alpha = 0) and get_batch_loss_metrics
    (loss = losses.mean() + cpo_alpha * nll_loss). Returns (batch loss, chosen_rewards, rejected_rewards)."""
    average = loss_type == "simpo"
    policy_chosen_logps = chosen_sum / chosen_len if average else chosen_sum
    policy_rejected_logps = rejected_sum / rejected_len if average else rejected_sum
    logits = policy_chosen_logps - policy_rejected_logps
    if loss_type == "simpo":
        gamma_logratios = simpo_gamma / beta
        logits = logits - gamma_logratios
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    nll_loss = -chosen_sum.sum() / chosen_len.sum()
    return (losses.mean() + cpo_alpha * nll_loss, beta * policy_chosen_logps.detach(),
            beta * policy_rejected_logps.detach())


def leaves(*values):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]


CHOSEN_SUM = [-4.0, -12.5, -3.2, -30.0, -7.7]
REJECTED_SUM = [-6.0, -10.0, -9.9, -28.0, -7.7]
REF_CHOSEN_SUM = [-5.0, -11.0, -3.0, -33.0, -8.1]
REF_REJECTED_SUM = [-5.5, -11.5, -8.0, -27.0, -7.2]
CHOSEN_LEN = [3.0, 9.0, 2.0, 17.0, 5.0]
REJECTED_LEN = [4.0, 7.0, 6.0, 15.0, 5.0]


@pytest.mark.parametrize("ours, theirs", DPO_TYPES.items())
def test_dpo_family_value_gradient_and_rewards_match_trl(ours, theirs):
    cfg = LossConfig(type=ours, beta=BETA, label_smoothing=SMOOTHING if ours == "robust" else 0.0)
    mine, trls = leaves(CHOSEN_SUM, REJECTED_SUM), leaves(CHOSEN_SUM, REJECTED_SUM)
    lengths = torch.tensor(CHOSEN_LEN, dtype=torch.float64), torch.tensor(REJECTED_LEN, dtype=torch.float64)
    ref = PairLogps(torch.tensor(REF_CHOSEN_SUM, dtype=torch.float64), torch.tensor(REF_REJECTED_SUM, dtype=torch.float64),
                    *lengths)
    terms = pair_losses(PairLogps(*mine, *lengths), cfg, ref)
    want, chosen_rewards, rejected_rewards = trl_dpo(
        theirs, *trls, ref.chosen_sum, ref.rejected_sum, *lengths, BETA, cfg.label_smoothing
    )
    torch.testing.assert_close(terms["loss"], want, rtol=1e-12, atol=1e-12)
    terms["loss"].mean().backward()
    want.mean().backward()
    for a, b in zip(mine, trls):
        assert b.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["rewards/chosen"], chosen_rewards)
    torch.testing.assert_close(terms["rewards/rejected"], rejected_rewards)
    torch.testing.assert_close(terms["rewards/margins"], chosen_rewards - rejected_rewards)
    assert torch.equal(terms["rewards/accuracies"], (chosen_rewards > rejected_rewards).double())
    assert torch.equal(terms["logps/chosen"], mine[0].detach()) and torch.equal(terms["logps/ref_chosen"], ref.chosen_sum)
    assert set(terms) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                          "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected"}


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
def test_simpo_and_cpo_value_gradient_and_rewards_match_trl(loss_type):
    cfg = LossConfig(type=loss_type, beta=BETA, label_smoothing=SMOOTHING, simpo_gamma=GAMMA, cpo_alpha=ALPHA)
    equal_len = [6.0] * len(CHOSEN_SUM)  # TRL's NLL is a token mean over the batch; ours a mean of per-pair means
    lengths = torch.tensor(equal_len, dtype=torch.float64), torch.tensor(REJECTED_LEN, dtype=torch.float64)
    mine, trls = leaves(CHOSEN_SUM, REJECTED_SUM), leaves(CHOSEN_SUM, REJECTED_SUM)
    terms = pair_losses(PairLogps(*mine, *lengths), cfg)
    alpha = ALPHA if loss_type == "cpo" else 0.0  # our simpo is TRL's with cpo_alpha=0, as in the SimPO paper
    want, chosen_rewards, rejected_rewards = trl_cpo(loss_type, *trls, *lengths, BETA, SMOOTHING, GAMMA, alpha)
    torch.testing.assert_close(terms["loss"].mean(), want, rtol=1e-12, atol=1e-12)
    terms["loss"].mean().backward()
    want.backward()
    for a, b in zip(mine, trls):
        assert b.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["rewards/chosen"], chosen_rewards)
    torch.testing.assert_close(terms["rewards/rejected"], rejected_rewards)
    torch.testing.assert_close(terms["logps/chosen"], chosen_rewards / BETA)
    assert ("nll_loss" in terms) == (loss_type == "cpo")


def test_sft_weight_adds_the_nll_of_chosen_as_rpo():
    """TRL 1.16 writes RPO as DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, w]); its "sft" term is the
    token mean of -log p over the batch's chosen tokens, equal to our per-pair mean when lengths agree."""
    lengths = torch.tensor([4.0, 4.0]), torch.tensor([3.0, 6.0])
    logps = PairLogps(torch.tensor([-2.0, -8.0]), torch.tensor([-3.0, -5.0]), *lengths)
    ref = PairLogps(torch.tensor([-2.5, -7.0]), torch.tensor([-3.5, -4.0]), *lengths)
    plain = pair_losses(logps, LossConfig(type="dpo", beta=BETA), ref)
    rpo = pair_losses(logps, LossConfig(type="dpo", beta=BETA, sft_weight=0.5), ref)
    sft = -logps.chosen_sum.sum() / lengths[0].sum()
    torch.testing.assert_close(rpo["loss"].mean(), plain["loss"].mean() + 0.5 * sft)
    torch.testing.assert_close(rpo["nll_loss"], torch.tensor([0.5, 2.0]))
    assert "nll_loss" not in plain


EXTREMES = {
    "certain answers": (0.0, 0.0, 0.0, 0.0),
    "very unlikely answers": (-1e4, -2e4, -3e4, -1e4),
    "equal answers": (-7.0, -7.0, -7.0, -7.0),
    "huge margin for": (0.0, -1e5, -1e5, 0.0),
    "huge margin against": (-1e5, 0.0, 0.0, -1e5),
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", EXTREMES)
def test_every_loss_is_finite_with_finite_gradients_at_the_extremes(loss_type, case):
    chosen, rejected, ref_chosen, ref_rejected = EXTREMES[case]
    policy = leaves([chosen], [rejected])
    lengths = torch.tensor([3.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)
    ref = PairLogps(torch.tensor([ref_chosen], dtype=torch.float64), torch.tensor([ref_rejected], dtype=torch.float64),
                    *lengths)
    cfg = LossConfig(type=loss_type, label_smoothing=0.1 if loss_type in ("robust", "simpo", "cpo") else 0.0)
    for dtype in (torch.float64, torch.float32):
        inputs = [p.to(dtype) for p in policy]
        terms = pair_losses(PairLogps(*inputs, *(x.to(dtype) for x in lengths)),
                            cfg, PairLogps(*(getattr(ref, f).to(dtype) for f in ("chosen_sum", "rejected_sum",
                                                                                 "chosen_tokens", "rejected_tokens"))))
        grads = torch.autograd.grad(terms["loss"].sum(), policy)
        assert all(torch.isfinite(v).all() for v in terms.values()), (dtype, terms)
        assert all(torch.isfinite(g).all() for g in grads), (dtype, grads)


@pytest.mark.parametrize("loss_type, want", [
    ("dpo", math.log(2)), ("sigmoid_norm", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0),
    ("ipo", (1 / (2 * BETA)) ** 2), ("apo_zero", 1.0),
])
def test_a_policy_equal_to_its_reference_has_the_closed_form_loss_and_zero_rewards(loss_type, want):
    logps = logps_from_means([-0.5, -2.0], [-1.0, -1.5])
    cfg = LossConfig(type=loss_type, beta=BETA, label_smoothing=SMOOTHING if loss_type == "robust" else 0.0)
    terms = pair_losses(logps, cfg, logps)
    torch.testing.assert_close(terms["loss"], torch.full((2,), want), rtol=1e-6, atol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.equal(terms[name], torch.zeros(2)), name


def test_the_dpo_family_refuses_to_run_without_reference_log_probs():
    with pytest.raises(ValueError, match="needs the reference"):
        pair_losses(logps_from_means([-0.5], [-1.0]), LossConfig(type="dpo"))


@pytest.mark.parametrize("values, message", [
    ({"type": "kto"}, "loss.type must be one of orpo, simpo, cpo, dpo"),
    ({"type": "dpo", "beta": 0.0}, "loss.beta must be > 0, got 0.0"),
    ({"type": "robust", "label_smoothing": 0.5}, "loss.label_smoothing must be in [0, 0.5), got 0.5"),
    ({"type": "cpo", "cpo_alpha": -1.0}, "loss.cpo_alpha must be >= 0"),
    ({"type": "simpo", "simpo_gamma": -0.1}, "loss.simpo_gamma must be >= 0"),
    ({"type": "dpo", "sft_weight": -1.0}, "loss.sft_weight must be >= 0"),
    ({"type": "dpo", "reference_device": "gpu7"}, "loss.reference_device 'gpu7' is not a device"),
])
def test_loss_knobs_are_checked_with_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        LossConfig(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_knob_the_loss_does_not_read_is_a_warning(caplog):
    LossConfig(type="dpo", beta=0.2, simpo_gamma=1.0)
    LossConfig(type="orpo", orpo_lambda=2.0, sft_on_prompt=True)
    assert [r.getMessage() for r in caplog.records] == ["loss.simpo_gamma is set but loss.type dpo does not read it"]
    LossConfig(type="dpo", sft_on_prompt=True)
    assert "has no NLL term" in caplog.records[-1].getMessage()


ROWS = [("base (step 0)", {"loss": 8.22354, "nll_loss": 7.50851, "or_loss": 0.71503, "rewards/accuracies": 0.48,
                           "rewards/margins": -0.01981, "log_odds_chosen": -0.01979, "pairs": 50.0})]


def test_the_orpo_results_table_is_unchanged():
    want = ("| Name | ORPO loss (λ = 1) | SFT loss | OR loss | Pref. accuracy | Reward margin | Log-odds |\n"
            "|---|---|---|---|---|---|---|\n"
            "| base (step 0) | 8.2235 | 7.5085 | 0.7150 | 48.0% | -0.0198 | -0.0198 |")
    assert results_table(ROWS, LossConfig(orpo_lambda=1.0)) == want


def test_results_tables_name_the_loss_its_values_and_its_own_columns():
    dpo = [("final", {"loss": 0.1864, "rewards/accuracies": 0.96, "rewards/margins": 2.087, "rewards/chosen": 0.9143,
                      "rewards/rejected": -1.1728, "nll_loss": 0.5})]
    assert results_table(dpo, LossConfig(type="dpo", beta=0.1)).splitlines()[::2] == [
        "| Name | DPO loss (β = 0.1) | Pref. accuracy | Reward margin | Chosen reward | Rejected reward |",
        "| final | 0.1864 | 96.0% | 2.0870 | 0.9143 | -1.1728 |",
    ]
    assert results_table(dpo, LossConfig(type="robust", label_smoothing=0.1, sft_weight=1.0)).startswith(
        "| Name | Robust DPO loss (β = 0.1, ε = 0.1, SFT weight = 1) | SFT loss | Pref. accuracy |")
    assert "| SimPO loss (β = 2, γ = 1) | Pref." in results_table(dpo, LossConfig(type="simpo", beta=2.0, simpo_gamma=1.0))
    assert "| CPO loss (β = 0.1, α = 1) | SFT loss |" in results_table(dpo, LossConfig(type="cpo"))
    assert [title for _, title in curves(LossConfig())] == ["ORPO loss", "SFT loss", "OR loss", "Preference accuracy"]
    assert [title for _, title in curves(LossConfig(type="dpo"))] == ["DPO loss", "Preference accuracy", "Reward margin"]
