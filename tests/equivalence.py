"""The equivalence check every family on the packed path passes: the packed shared-prefix forward against the
plain two-sequence forward (`modeling.plain`), on per-pair log-probs, the ORPO loss and every LoRA gradient; with
several rejected answers per prompt (`with_rejected`), against the plain forward of k + 1 sequences."""

from __future__ import annotations

import dataclasses

from peft import LoraConfig, get_peft_model

from vlm_orpo.config import LossConfig
from vlm_orpo.data.packing import PackedCollator
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.families import family_for
from vlm_orpo.modeling.load import lora_target_regex
from vlm_orpo.modeling.plain import plain_pair_logps
from vlm_orpo.modeling.shared_prefix import packed_logps

LOGP_RTOL, GRAD_RTOL = 1e-5, 1e-4
LAMBDA = 0.5


def lora_model(base):
    family = family_for(base.config)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_target_regex(base, family, "all-linear"),
        init_lora_weights=False,  # random B too, so every LoRA gradient is non-zero and compared
    )
    return get_peft_model(base, config)


def grads_and_loss(model, compute):
    model.zero_grad(set_to_none=True)
    logps = compute()
    terms = pair_losses(logps, LossConfig(orpo_lambda=LAMBDA))
    terms["loss"].mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps, terms, grads


def with_rejected(pairs, k):
    """Each pair given k rejected answers: its own, then other pairs' (of other lengths) as rejected 2..k."""
    n = len(pairs)
    return [dataclasses.replace(p, more_rejected_ids=[pairs[(i + j) % n].rejected_ids[: 2 + (i + j) % 5]
                                                      for j in range(1, k)]) for i, p in enumerate(pairs)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_equivalent(model, pairs, pad_id, image_token_id, max_tokens_per_row, gradient_checkpointing=False):
    model = lora_model(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    collator = PackedCollator(pad_id, image_token_id, max_tokens_per_row=max_tokens_per_row)
    batch = collator(pairs)
    packed, packed_terms, packed_grads = grads_and_loss(model, lambda: packed_logps(model, batch))
    plain, plain_terms, plain_grads = grads_and_loss(model, lambda: plain_pair_logps(model, pairs, pad_id))

    assert rel_err(packed.chosen, plain.chosen) <= LOGP_RTOL
    assert rel_err(packed.rejected, plain.rejected) <= LOGP_RTOL
    assert rel_err(packed_terms["loss"], plain_terms["loss"]) <= LOGP_RTOL
    assert packed_grads.keys() == plain_grads.keys() and len(packed_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.norm() > 0, name
        assert rel_err(packed_grads[name], grad) <= GRAD_RTOL, name
    return batch


