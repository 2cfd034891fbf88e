"""Load a VLM and its processor, and attach the trainable part: LoRA, QLoRA or full fine-tuning."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlm_orpo.config import BUNDLED, ConfigError, LoraSettings, ModelConfig
from vlm_orpo.errors import first_line
from vlm_orpo.modeling.families import ModelFamily, family_for
from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

log = logging.getLogger(__name__)

def adapter_config(path: str | Path) -> dict:
    """A PEFT adapter directory's adapter_config.json, or one line saying why `path` is not such a directory."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"adapter not found: {path}")
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"not a PEFT adapter directory (no adapter_config.json): {path}")
    return json.loads(config.read_text())


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == BUNDLED or name_or_path.startswith(BUNDLED + ":"):
        from vlm_orpo.assets import DEFAULT_TINY_MODEL, ensure_tiny_model

        family = name_or_path.partition(":")[2] or DEFAULT_TINY_MODEL
        try:
            return ensure_tiny_model(family)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"model path not found: {path}")
    if (path / "adapter_config.json").is_file():
        raise ConfigError(f"{name_or_path} is a LoRA adapter, not a model: merge it first (`vlm-orpo merge --adapter "
                          f"{name_or_path}`), or give it as an adapter with its base model")
    return str(path) if path.exists() else name_or_path


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def from_pretrained(loader, cfg: ModelConfig, **kwargs):
    """`loader.from_pretrained` of the configured model; a hub name typo or a missing file is one line."""
    try:
        return loader.from_pretrained(
            resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise ConfigError(f"cannot load model {cfg.name_or_path!r}: {first_line(exc, with_type=False)}") from None


def load_processor(cfg: ModelConfig):
    allow_processors_without_torchvision()
    return from_pretrained(AutoProcessor, cfg, **cfg.processor_kwargs)


def model_family(cfg: ModelConfig) -> ModelFamily:
    config = from_pretrained(AutoConfig, cfg)
    try:
        return family_for(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_base_model(cfg: ModelConfig, device: torch.device, quantize_4bit: bool = False):
    family = model_family(cfg)
    kwargs = {}
    if quantize_4bit:
        if device.type != "cuda":
            raise ConfigError("lora.method=qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora or full on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=resolve_dtype(cfg.dtype, device),
            llm_int8_skip_modules=[family.vision_tower, family.projector, "lm_head"],
        )
    model = from_pretrained(
        AutoModelForImageTextToText, cfg, dtype=resolve_dtype(cfg.dtype, device), attn_implementation="sdpa", **kwargs
    )
    return model if quantize_4bit else model.to(device)


def lora_target_regex(model, family: ModelFamily, targets: list[str] | str) -> str:
    """A PEFT target regex for linear layers inside the language model only (never vision or projector)."""
    prefix = family.language_model + "."
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name.startswith(prefix) and _is_linear(m)}
    )
    wanted = linear_names if targets == "all-linear" else [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in wanted if t not in linear_names]
    if unknown:
        raise ConfigError(f"lora.target_modules {unknown} not found; linear layers here: {', '.join(linear_names)}")
    return rf"^{re.escape(family.language_model)}\..*\.({'|'.join(map(re.escape, wanted))})$"


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def attach_adapter(model, family: ModelFamily, settings: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap for training: LoRA/QLoRA via PEFT, or unfreeze the language model for full fine-tuning."""
    if settings.method == "full":
        for name, param in model.named_parameters():
            trainable = name.startswith(family.language_model) or name.startswith("lm_head")
            param.requires_grad = trainable or (settings.train_projector and name.startswith(family.projector))
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(model, family, settings.target_modules),
        modules_to_save=[family.projector] if settings.train_projector else None,
        bias="none",
    )
    return get_peft_model(model, lora)


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
