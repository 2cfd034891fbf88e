"""The reference model of the DPO family, as cheap as it can be and exact: its log-probs of the same packed batch.

- LoRA / QLoRA: the reference is the base model, which is the policy with its adapter switched off
  (`PeftModel.disable_adapter`, which also routes `modules_to_save`, e.g. a trained projector, back to the
  original module). No second copy of the weights: one more forward, under no_grad, in the same step.
- Full fine-tuning: a frozen copy of the model taken before the first step, on `loss.reference_device`.
- `loss.reference_model`: that model, loaded once and frozen (any adapter method).
- Scoring a plain model with no reference configured (`vlm-orpo evaluate`'s base row): the model is its own
  reference, so its rewards are 0.
- `loss.precompute_reference`: any of the above, run once over the train and validation sets before training
  (`precompute`); the log-probs are kept beside the run, keyed by what decides them, and ride in the batch, so a
  step has no reference forward and a full fine-tune drops its frozen copy.

Each kind has `logps(model, batch) -> PairLogps`, where `model` is the policy as the caller holds it (possibly
wrapped by DDP) and `batch` the packed batch of `data.packing.PackedCollator`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from vlm_orpo.config import ConfigError, LossConfig, ModelConfig
from vlm_orpo.data.packing import PairDataset, Part, move_batch
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling.forward import pair_logps
from vlm_orpo.modeling.logps import sums_to_pair_logps
from vlm_orpo.modeling.shared_prefix import attention_backend, unwrap

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"  # in the run directory
_GROUPS = "{}.pairs_per_group"  # beside each dataset's sums: how many derived pairs each row has


def peft_model(model):
    """The PeftModel under DDP/compile wrappers, or None for a plain model."""
    from peft import PeftModel

    while hasattr(model, "module") and not isinstance(model, PeftModel):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, PeftModel) else None


class AdapterDisabled:
    """The base model of a LoRA/QLoRA policy: the same forward with the adapter switched off."""

    def __init__(self, peft):
        self.peft = peft

    def __str__(self) -> str:
        return "the base model (the same forward with the adapter disabled)"

    def logps(self, model, batch: dict) -> PairLogps:
        with torch.no_grad(), self.peft.disable_adapter():
            return pair_logps(model, batch)


class FrozenModel:
    """A model that never trains, on its own device; its log-probs come back on the batch's device."""

    def __init__(self, model, what: str):
        self.model = model
        self.what = what

    def __str__(self) -> str:
        return f"{self.what} on {self.device}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logps(self, model, batch: dict) -> PairLogps:
        home = batch["input_ids"].device
        with torch.no_grad():
            logps = pair_logps(self.model, move_batch(batch, self.device) if home != self.device else batch)
        return PairLogps(**{
            f.name: None if getattr(logps, f.name) is None else getattr(logps, f.name).to(home)
            for f in dataclasses.fields(logps)
        })


def reference_for(model, loss_cfg: LossConfig, *, training: bool = False):
    """The reference `loss_cfg` needs for `model`, or None for a reference-free loss.

    `training`: a plain (fully fine-tuned) model gets a frozen copy of itself now, before it changes; when only
    scoring, a plain model is its own reference."""
    if not loss_cfg.needs_reference:
        return None
    hf = unwrap(model)
    device = torch.device(loss_cfg.reference_device) if loss_cfg.reference_device else hf.device
    if loss_cfg.reference_model:
        dtype = str(hf.dtype).removeprefix("torch.")
        loaded = _load_reference(loss_cfg.reference_model, str(device), dtype, attention_backend(hf))
        if loaded.config.get_text_config().vocab_size != hf.config.get_text_config().vocab_size:
            raise ConfigError(f"loss.reference_model {loss_cfg.reference_model} has another vocabulary than the model")
        return FrozenModel(loaded, f"loss.reference_model {loss_cfg.reference_model}")
    peft = peft_model(model)
    if peft is not None:
        if loss_cfg.reference_device:
            raise ConfigError("loss.reference_device is for a frozen reference (full fine-tuning or "
                              "loss.reference_model); a LoRA model's reference is itself with the adapter disabled")
        return AdapterDisabled(peft)
    if not training:
        return FrozenModel(hf, "the model itself")
    frozen = copy.deepcopy(hf).to(device).eval().requires_grad_(False)
    return FrozenModel(frozen, "a frozen copy of the model before training")


@functools.lru_cache(maxsize=1)
def _load_reference(name_or_path: str, device: str, dtype: str, backend: str):
    """Loaded once per process, so `vlm-orpo evaluate` scores every adapter against one copy."""
    from vlm_orpo.modeling.load import load_base_model
    from vlm_orpo.modeling.shared_prefix import set_attention_backend

    model = load_base_model(ModelConfig(name_or_path=name_or_path, dtype=dtype), torch.device(device))
    set_attention_backend(model, backend)
    return model.eval().requires_grad_(False)


class Precomputed:
    """Reference log-probs computed before training (`precompute`), read from the batch: no forward at all."""

    def __init__(self, what: str):
        self.what = what

    def __str__(self) -> str:
        return f"precomputed log-probs of {self.what}"

    def logps(self, model, batch: dict) -> PairLogps:
        if "reference_logps" not in batch:
            raise ValueError("loss.precompute_reference: this batch carries no reference log-probs")
        return sums_to_pair_logps(batch["reference_logps"], batch["segment_tokens"])


def precompute(reference, model, datasets: dict[str, PairDataset], collator, batch_size: int, path: Path,
               facts: dict) -> Precomputed:
    """Run `reference` once over `datasets` and attach its per-pair log-prob sums to them; kept in `path`.

    The file is keyed by `facts` (model, revision, dtype, reference), the reference's kind and each dataset's
    fingerprint (its rows, tokenizer, template and length limits): a resume with the same key reads it, any
    change computes it again, so stale log-probs are never used."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = hashlib.sha256(json.dumps(
        {**facts, "reference": str(reference), "data": {name: d.fingerprint for name, d in datasets.items()}},
        sort_keys=True, default=str).encode()).hexdigest()
    tensors = None
    if path.is_file():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key and set(f.keys()) == {*datasets, *map(_GROUPS.format, datasets)}:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                log.info("reference log-probs: reusing %s", path)
    if tensors is None:
        log.info("reference log-probs: one pass of %s over %s", reference,
                 ", ".join(f"{len(d)} {name} pairs" for name, d in datasets.items()))
        tensors = {}
        for name, dataset in datasets.items():
            sums, groups = _reference_sums(reference, model, dataset, collator, batch_size)
            tensors[name], tensors[_GROUPS.format(name)] = sums, groups
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial, metadata={"key": key, "facts": json.dumps(facts, default=str)})
        partial.replace(path)
    for name, dataset in datasets.items():
        dataset.reference_logps = list(tensors[name].split(tensors[_GROUPS.format(name)].tolist()))
    return Precomputed(str(reference))


@torch.no_grad()
def _reference_sums(reference, model, dataset: PairDataset, collator, batch_size: int) -> tuple[torch.Tensor, ...]:
    """[derived pairs, len(Part)] reference log-prob sums (prompt, chosen, rejected) in dataset order, and each
    row's number of derived pairs (its rejected answers) [rows], which splits them back by row."""

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    sums, groups = [], []
    try:
        for batch in loader:
            logps = reference.logps(model, move_batch(batch, device))
            prompt = logps.prompt_sum if logps.prompt_sum is not None else torch.zeros_like(logps.chosen_sum)
            parts = {Part.PROMPT: prompt, Part.CHOSEN: logps.chosen_sum, Part.REJECTED: logps.rejected_sum}
            sums.append(torch.stack([parts[p] for p in Part], dim=1).float().cpu())
            groups.append(batch["pairs_per_group"])
    finally:
        model.train(was_training)
    return torch.cat(sums), torch.cat(groups)
