"""The reference of the DPO family: the disabled adapter is exactly the base model (projector included), the
packed reference log-probs equal the plain forward's, a full fine-tune gets a frozen copy, the trainer calls the
reference only for a loss that needs one, and the DPO quickstart learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import ROOT, run_cli
from vlm_orpo.config import REFERENCE_FREE_LOSSES, LoraSettings, LossConfig, PreferenceTrainingArguments
from vlm_orpo.data.packing import PackedCollator
from vlm_orpo.errors import ConfigError
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.load import attach_adapter
from vlm_orpo.modeling.plain import plain_pair_logps
from vlm_orpo.modeling.shared_prefix import packed_logps, set_attention_backend
from vlm_orpo.reference import AdapterDisabled, FrozenModel, reference_for
from vlm_orpo.scoring import score_batches

DPO = LossConfig(type="dpo", beta=0.1)
RTOL = 1e-5


def base_model(asset_cache):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"], dtype=torch.float32)
    set_attention_backend(model, "sdpa")
    return model


def lora_model(asset_cache, **settings):
    """The tiny LLaVA-NeXT with LoRA on every linear layer of the language model and the projector trained."""
    base = base_model(asset_cache)
    return attach_adapter(base, family_for(base.config), LoraSettings(dropout=0.0, train_projector=True, **settings))


def perturb_adapter(model):
    """Random LoRA B and a moved projector copy: the adapter now changes every log-prob."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)


def batch_of(tiny_pairs, n=4, **kwargs):
    encoder, pairs = tiny_pairs
    collator = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id, **kwargs)
    return collator(pairs[:n]), pairs[:n], encoder.tokenizer.pad_token_id


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dpo_at_init_is_log_2_with_zero_rewards_and_trains(asset_cache, tiny_pairs):
    model = lora_model(asset_cache)  # PEFT's init: LoRA B = 0, the projector copy equal to the original
    batch, _, _ = batch_of(tiny_pairs, max_tokens_per_row=4096)
    reference = reference_for(model, DPO, training=True)
    assert isinstance(reference, AdapterDisabled)
    terms = pair_losses(packed_logps(model, batch), DPO, reference.logps(model, batch))
    assert torch.equal(terms["loss"].detach(), torch.full((4,), -torch.nn.functional.logsigmoid(torch.tensor(0.0))))
    torch.testing.assert_close(terms["loss"].detach(), torch.full((4,), math.log(2)), rtol=0, atol=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert torch.equal(terms[name], torch.zeros(4)), name
    terms["loss"].mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items()), "DPO must move the adapter at init"


def test_packed_reference_equals_the_plain_forward_with_the_adapter_disabled(asset_cache, tiny_pairs):
    model = lora_model(asset_cache)
    perturb_adapter(model)
    batch, pairs, pad_id = batch_of(tiny_pairs, max_tokens_per_row=700)
    ref = AdapterDisabled(model).logps(model, batch)
    with torch.no_grad():
        policy = packed_logps(model, batch)
        with model.disable_adapter():
            plain = plain_pair_logps(model, pairs, pad_id)
        untouched = plain_pair_logps(base_model(asset_cache), pairs, pad_id)  # a fresh base: the reference by definition
    assert rel_err(ref.chosen_sum, plain.chosen_sum) <= RTOL and rel_err(ref.rejected_sum, plain.rejected_sum) <= RTOL
    assert rel_err(ref.chosen_sum, untouched.chosen_sum) <= RTOL
    assert rel_err(ref.rejected_sum, untouched.rejected_sum) <= RTOL
    assert rel_err(policy.chosen_sum, ref.chosen_sum) > 1e-3, "the adapter must matter, or this proves nothing"
    assert not ref.chosen_sum.requires_grad


def test_disable_adapter_reverts_the_trained_projector_and_restores_its_gradients(asset_cache):
    model = lora_model(asset_cache)
    perturb_adapter(model)
    projector = model.base_model.model.model.multi_modal_projector  # PEFT's ModulesToSaveWrapper
    original = base_model(asset_cache).model.multi_modal_projector
    features = torch.randn(3, original.linear_1.in_features)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        assert not torch.allclose(projector(features), original(features))
        with model.disable_adapter():
            torch.testing.assert_close(projector(features), original(features), rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert any("modules_to_save" in n for n in trainable)


def test_full_fine_tuning_gets_a_frozen_copy_taken_before_training(asset_cache, tiny_pairs):
    model = base_model(asset_cache)
    model = attach_adapter(model, family_for(model.config), LoraSettings(method="full"))
    batch, _, _ = batch_of(tiny_pairs, max_tokens_per_row=4096)
    with torch.no_grad():
        before = packed_logps(model, batch)
    reference = reference_for(model, LossConfig(type="dpo", reference_device="cpu"), training=True)
    assert isinstance(reference, FrozenModel) and reference.model is not model
    assert not any(p.requires_grad for p in reference.model.parameters())
    with torch.no_grad():
        for param in model.parameters():  # a training step moves the policy, never the reference
            param.add_(torch.randn_like(param) * 0.01)
    ref = reference.logps(model, batch)
    torch.testing.assert_close(ref.chosen_sum, before.chosen_sum, rtol=0, atol=0)
    assert rel_err(packed_logps(model, batch).chosen_sum.detach(), ref.chosen_sum) > 1e-4


def test_reference_model_path_and_device_rules(asset_cache, tiny_pairs):
    model = lora_model(asset_cache)
    perturb_adapter(model)
    batch, _, _ = batch_of(tiny_pairs, max_tokens_per_row=4096)
    loaded = reference_for(model, LossConfig(type="dpo", reference_model=asset_cache["tiny_model"]))
    assert isinstance(loaded, FrozenModel)
    want = AdapterDisabled(model).logps(model, batch)
    got = loaded.logps(model, batch)
    assert rel_err(got.chosen_sum, want.chosen_sum) <= RTOL and rel_err(got.rejected_sum, want.rejected_sum) <= RTOL
    with pytest.raises(ConfigError, match="loss.reference_device is for a frozen reference"):
        reference_for(model, LossConfig(type="dpo", reference_device="cpu"))
    for loss_type in REFERENCE_FREE_LOSSES:
        assert reference_for(model, LossConfig(type=loss_type)) is None


def test_scoring_gives_the_training_metrics_and_a_plain_model_is_its_own_reference(asset_cache, tiny_pairs):
    model = lora_model(asset_cache)
    perturb_adapter(model)
    batch, _, _ = batch_of(tiny_pairs, max_tokens_per_row=4096)
    scores = score_batches(model, [batch], DPO)
    with torch.no_grad():
        want = pair_losses(packed_logps(model, batch), DPO, AdapterDisabled(model).logps(model, batch))
    assert set(scores.values) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(scores.values[name], value, rtol=1e-6, atol=1e-7, msg=name)
    base = score_batches(base_model(asset_cache), [batch], DPO)
    assert torch.equal(base.values["rewards/margins"], torch.zeros(4))
    assert base.means()["loss"] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize("loss_type, checkpointing", [("orpo", False), ("dpo", False), ("dpo", True)],
                         ids=["orpo", "dpo", "dpo-grad-ckpt"])
def test_the_trainer_calls_the_reference_only_when_the_loss_needs_one(asset_cache, tiny_pairs, tmp_path, loss_type,
                                                                       checkpointing):
    from vlm_orpo.trainer import PreferenceTrainer

    model = lora_model(asset_cache)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, _, _ = batch_of(tiny_pairs, max_tokens_per_row=4096)
    args = PreferenceTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = PreferenceTrainer(model=model, args=args, loss_cfg=LossConfig(type=loss_type))
    calls = []
    if trainer.reference is not None:
        real = trainer.reference.logps
        trainer.reference.logps = lambda *a: calls.append(1) or real(*a)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert len(calls) == (loss_type == "dpo")
    assert (trainer.reference is None) == (loss_type == "orpo")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "the adapter trains on"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    if loss_type == "dpo":
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert trainer._train_metrics["logps/ref_chosen"], "the reference's log-probs are logged under TRL's names"


@pytest.mark.slow
def test_dpo_quickstart_learns_against_the_disabled_adapter(asset_cache, tmp_path):
    """A shortened configs/quickstart_dpo.yaml: held-out reward accuracy rises from 0 (policy = reference) and the
    loss falls below log 2. The full config reaches >= 90% (see README)."""
    run = tmp_path / "run"
    result = run_cli("train", "--config", str(ROOT / "configs" / "quickstart_dpo.yaml"), f"training.output_dir={run}",
                     "training.max_steps=16", "training.lr_scheduler_type=constant", "training.eval_steps=16",
                     "training.save_steps=16", "data.eval_limit=24")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_rewards/accuracies"] == 0.0
    assert evals[-1]["step"] == 16 and evals[-1]["eval_rewards/accuracies"] >= 0.6
    assert evals[-1]["eval_loss"] < math.log(2) - 0.02
    assert {"eval_logps/ref_chosen", "eval_rewards/margins"} <= set(evals[-1])
    assert "| DPO loss (β = 0.1) | Pref. accuracy |" in result.stdout
    assert "reference: the base model (the same forward with the adapter disabled)" in result.stdout
    assert (run / "dpo_loss.png").stat().st_size > 1000


def dpo_run(capsys, out, *overrides):
    from test_cli import main_in_process

    result = main_in_process(capsys, "train", "--config", str(ROOT / "configs" / "quickstart_dpo.yaml"),
                             "training.max_steps=3", "training.logging_steps=1", "training.eval_steps=3",
                             "training.save_steps=3", "data.eval_limit=16", f"training.output_dir={out}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_trains_as_the_live_one_and_is_reused_only_while_valid(asset_cache, tmp_path, capsys,
                                                                                     caplog, method):
    from vlm_orpo.reference import REFERENCE_FILE

    caplog.set_level("INFO", logger="vlm_orpo.reference")
    live = dpo_run(capsys, tmp_path / "live", f"lora.method={method}")
    caplog.clear()
    pre = dpo_run(capsys, tmp_path / "pre", f"lora.method={method}", "loss.precompute_reference=true")
    assert any(m.startswith("reference log-probs: one pass of") for m in caplog.messages)
    assert [r["step"] for r in live] == [r["step"] for r in pre]
    for a, b in zip(live, pre):  # the same first steps, evaluation included (reference rewards and margins)
        for key in ("loss", "rewards/margins", "logps/ref_chosen", "eval_loss", "eval_rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)  # abs: rewards at init are 0
    assert (tmp_path / "pre" / REFERENCE_FILE).is_file() and not (tmp_path / "live" / REFERENCE_FILE).exists()
    if method == "full":
        return
    caplog.clear()
    dpo_run(capsys, tmp_path / "pre", "loss.precompute_reference=true", "--overwrite")
    assert f"reference log-probs: reusing {tmp_path / 'pre' / REFERENCE_FILE}" in caplog.messages
    caplog.clear()
    dpo_run(capsys, tmp_path / "pre", "loss.precompute_reference=true", "data.max_answer_tokens=24", "--overwrite")
    assert any(m.startswith("reference log-probs: one pass of") for m in caplog.messages), "changed data: recomputed"
