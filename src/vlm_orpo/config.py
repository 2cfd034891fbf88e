"""Typed run configuration: a YAML file with data, model, lora, loss and training sections, plus `key=value`
overrides.

The loss has its own section (torchtune's `loss:` node): `train` and `evaluate` both read it there. The training
section is `PreferenceTrainingArguments`, a transformers `TrainingArguments` (TRL's config idiom), so every usual
Trainer option works; its values are type- and range-checked at load, before anything heavy starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from vlm_orpo.errors import ConfigError, first_line
from vlm_orpo.images import MAX_IMAGE_PIXELS
from vlm_orpo.modeling.backends import ATTN_BACKENDS

BUNDLED = "bundled"  # the tiny model and synthetic data that `vlm-orpo assets` builds offline
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16/float16 on CUDA, float32 elsewhere
log = logging.getLogger(__name__)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans and floats: `eval_strategy: no` stays the string "no", `5e-3` is a number."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass
class DataConfig:
    source: str = BUNDLED  # "bundled", a hub dataset name, or a local parquet/jsonl/json file or directory
    train_split: str = "train"
    validation_split: str | None = None  # a named split; wins over validation_fraction
    validation_fraction: float = 0.0
    subset_fraction: float = 1.0  # the seed trained on 10% of RLAIF-V
    seed: int = 42
    # canonical name -> column, e.g. {"question": "prompt"}; rejected may list several, e.g. [rejected_1, rejected_2]
    columns: dict[str, str | list[str]] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)  # keep rows whose column is one of these values
    max_answer_tokens: int = 128
    max_prompt_tokens: int | None = None  # longer prompts (image tokens included) are skipped, never cut
    max_tokens_per_row: int | None = None  # pack several pairs per row up to this length; None = a pair per row
    eval_limit: int | None = None  # score at most this many validation pairs
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped (counted), never decoded
    num_proc: int | None = None  # processes that validate rows (default: the cores); the outcome is cached
    streaming: bool = False  # read the data as a stream, never downloaded whole (data/streaming.py); needs max_steps
    shuffle_buffer: int = 1000  # rows shuffled together when streaming; 0 = stream order

    def __post_init__(self):
        _check(0 < self.subset_fraction <= 1, f"data.subset_fraction must be in (0, 1], got {self.subset_fraction}")
        _check(0 <= self.validation_fraction < 1, "data.validation_fraction must be in [0, 1)")
        for name in ("max_answer_tokens", "max_prompt_tokens", "max_tokens_per_row", "eval_limit", "max_image_pixels",
                     "num_proc"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name} must be positive, got {value}")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be 0 or more, got {self.shuffle_buffer}")
        _check(not self.streaming or self.eval_limit is not None or not (self.validation_split or
                                                                       self.validation_fraction),
               "data.streaming reads the held-out pairs once, into memory: set data.eval_limit (e.g. 500)")


FORWARD_MODES = ("auto", "packed", "plain")


@dataclass
class ModelConfig:
    name_or_path: str = BUNDLED  # "bundled" = the tiny LLaVA-NeXT built by `vlm-orpo assets`
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_backend: str = "auto"  # one of modeling.backends.ATTN_BACKENDS (auto: the fastest exact one here)
    forward_mode: str = "auto"  # auto | packed (shared prefix; an error where unsupported) | plain (two sequences)
    compile_layers: bool | str = "auto"  # torch.compile each decoder layer: auto = on CUDA only
    revision: str | None = None
    trust_remote_code: bool = False
    # passed to AutoProcessor.from_pretrained, e.g. {max_pixels: 1003520} caps Qwen2-VL's image tokens (~1280 here)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.attn_backend in ATTN_BACKENDS,
               f"model.attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {self.attn_backend!r}")
        _check(self.compile_layers in (True, False, "auto"), "model.compile_layers must be true, false or auto")
        _check(self.forward_mode in FORWARD_MODES,
               f"model.forward_mode must be one of {', '.join(FORWARD_MODES)}, got {self.forward_mode!r}")


@dataclass
class LoraSettings:
    method: str = "lora"  # lora | qlora (4-bit base, CUDA only) | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"  # within the language model only
    train_projector: bool = False

    def __post_init__(self):
        _check(self.method in ("lora", "qlora", "full"), f"lora.method must be lora, qlora or full, got {self.method!r}")
        _check(self.r > 0, f"lora.r must be positive, got {self.r}")
        _check(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")


# Reference-free losses (ORPO, and SimPO and CPO from TRL's CPOTrainer), then the DPO family of TRL's DPOTrainer
# (loss_type sigmoid = dpo, ipo, hinge, robust, apo_zero, sigmoid_norm), which compares against a reference model.
REFERENCE_FREE_LOSSES = ("orpo", "simpo", "cpo")
REFERENCE_LOSSES = ("dpo", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm")
LOSS_TYPES = REFERENCE_FREE_LOSSES + REFERENCE_LOSSES
DEFAULT_ORPO_LAMBDA = 0.1  # TRL's ORPOConfig beta and the ORPO paper's lambda; the seed's run set 10
_REFERENCE_KNOBS = ("beta", "reference_model", "reference_device", "precompute_reference")
# The knobs each loss reads, besides sft_on_prompt (read wherever there is an NLL term). A knob set away from its
# default for a loss that does not read it is a warning: it would change nothing.
LOSS_KNOBS = {
    "orpo": ("orpo_lambda",),
    "simpo": ("beta", "simpo_gamma", "label_smoothing", "sft_weight"),
    "cpo": ("beta", "cpo_alpha", "label_smoothing"),
    "robust": (*_REFERENCE_KNOBS, "label_smoothing", "sft_weight"),
    **{name: (*_REFERENCE_KNOBS, "sft_weight") for name in ("dpo", "ipo", "hinge", "apo_zero", "sigmoid_norm")},
}


@dataclass
class LossConfig:
    """The preference loss and its parameters, named as TRL names them (DPOConfig, CPOConfig, ORPOConfig)."""

    type: str = "orpo"
    beta: float = 0.1  # TRL's beta: reward scale (DPO family, SimPO, CPO); IPO's tau
    label_smoothing: float = 0.0  # robust: the rate of flipped labels; simpo/cpo: TRL's conservative smoothing
    simpo_gamma: float = 0.5  # SimPO's target reward margin (TRL's default)
    cpo_alpha: float = 1.0  # weight of CPO's NLL term on chosen (TRL's default)
    orpo_lambda: float = DEFAULT_ORPO_LAMBDA  # weight of the odds-ratio term (TRL's `beta` for ORPO)
    sft_weight: float = 0.0  # weight of an NLL term on chosen (RPO's alpha) for the DPO family and SimPO
    sft_on_prompt: bool = False  # add the prompt's text tokens to the NLL term (the collator then scores them)
    reference_model: str | None = None  # a frozen reference loaded from here (default: the base model, see reference.py)
    reference_device: str | None = None  # where a frozen reference lives (full fine-tuning); default the model's
    # one reference pass over the data before training, kept beside the run; then no reference forward per step
    precompute_reference: bool = False

    def __post_init__(self):
        _check(self.type in LOSS_TYPES, f"loss.type must be one of {', '.join(LOSS_TYPES)}, got {self.type!r}")
        _check(self.beta > 0, f"loss.beta must be > 0, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("simpo_gamma", "cpo_alpha", "orpo_lambda", "sft_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.reference_device is not None:
            import torch

            try:
                torch.device(self.reference_device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"loss.reference_device {self.reference_device!r} is not a device (cpu, cuda:1)") from None
        for knob in dataclasses.fields(self):
            unread = knob.name not in (*LOSS_KNOBS[self.type], "type", "sft_on_prompt")
            if unread and getattr(self, knob.name) != knob.default:
                log.warning("loss.%s is set but loss.type %s does not read it", knob.name, self.type)
        if self.sft_on_prompt and self.nll_weight == 0:
            log.warning("loss.sft_on_prompt is set but loss.type %s has no NLL term (see loss.sft_weight)", self.type)

    @property
    def needs_reference(self) -> bool:
        return self.type in REFERENCE_LOSSES

    @property
    def nll_weight(self) -> float:
        """Weight of the NLL term on chosen: 1 in ORPO (the paper), cpo_alpha in CPO, sft_weight elsewhere."""
        return {"orpo": 1.0, "cpo": self.cpo_alpha}.get(self.type, self.sft_weight)

    def knobs(self) -> dict[str, float]:
        """The numbers this loss reads (a zero smoothing or SFT weight left out): the plan line, the table title."""
        return {k: getattr(self, k) for k in LOSS_KNOBS[self.type] if type(getattr(self, k)) in (int, float)
                and (getattr(self, k) or k not in ("label_smoothing", "sft_weight"))}

    def describe(self) -> str:
        if self.type == "orpo":
            return f"orpo (ORPO lambda {self.orpo_lambda:g})"
        return f"{self.type} ({', '.join(f'{k} {v:g}' for k, v in self.knobs().items())})"


# Keys that lived in `training:` before the loss had its own section: still read, with a deprecation line.
MOVED_TO_LOSS = ("orpo_lambda", "sft_on_prompt")
_POSITIVE = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
             "gradient_accumulation_steps", "logging_steps", "save_steps", "eval_steps")
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers")


@dataclass
class PreferenceTrainingArguments(TrainingArguments):
    """TrainingArguments, range-checked, plus the metric that picks best/."""

    best_metric: str = field(default="loss", metadata={"help": "eval metric that picks best/: loss or accuracy"})
    output_dir: str = field(default="runs/vlm-orpo")
    remove_unused_columns: bool = False
    report_to: Any = "none"
    # TrainingArguments types it `str | None` for its legacy strings, though `fsdp: true` is the spelling it wants
    fsdp: bool | str | None = field(default=None, metadata={"help": "FSDP on (true); settings in fsdp_config"})

    def __post_init__(self):
        for name in _POSITIVE:
            value = getattr(self, name)
            _check(value is None or value > 0, f"training.{name} must be positive, got {value}")
        for name in _NON_NEGATIVE:
            _check(getattr(self, name) >= 0, f"training.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.max_steps > 0 or self.num_train_epochs > 0,
               f"training.num_train_epochs must be positive (or set max_steps), got {self.num_train_epochs}")
        _check(self.best_metric in ("loss", "accuracy"), "training.best_metric must be loss or accuracy")
        super().__post_init__()


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    training: dict[str, Any] = field(default_factory=dict)  # kwargs of PreferenceTrainingArguments

    @property
    def output_dir(self) -> str:
        return self.training.get("output_dir") or PreferenceTrainingArguments.__dataclass_fields__["output_dir"].default

    def as_dict(self) -> dict[str, Any]:
        """The config as its sections (what trackers and model cards record)."""
        return {**{name: dataclasses.asdict(getattr(self, name)) for name in ("data", "model", "lora", "loss")},
                "training": dict(self.training)}

    def training_args(self, **overrides) -> PreferenceTrainingArguments:
        return build_dataclass(PreferenceTrainingArguments, {**self.training, **overrides}, "training")


SECTIONS = {
    "data": DataConfig, "model": ModelConfig, "lora": LoraSettings, "loss": LossConfig,
    "training": PreferenceTrainingArguments,
}


def add_config_arguments(parser) -> None:
    """`--config FILE.yaml` and `section.key=value` overrides, for the commands that read a run config."""
    parser.add_argument("--config", help="YAML file with data/model/lora/loss/training sections")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.learning_rate=1e-4")


def _argument_type(convert, lowest, name: str):
    """An argparse type: `convert(text)`, finite and at least `lowest` (argparse makes the error one usage line)."""
    import argparse

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value) or value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        return value

    return parse


positive_int = _argument_type(int, 1, "a whole number")
non_negative_int = _argument_type(int, 0, "a whole number")
non_negative_float = _argument_type(float, 0, "a number")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _unknown_key_error(section: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    shown = valid if len(valid) <= 30 else [*valid[:30], "..."]
    return ConfigError(f"unknown key {section}.{key}.{hint} Valid keys: {', '.join(shown)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's annotation (str, int, float, bool, None, dict, list and unions)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    wanted = origin or hint
    return isinstance(value, wanted) if isinstance(wanted, type) else True  # Literal and the like: the class checks


def check_types(cls, values: dict[str, Any], section: str) -> None:
    """Known keys, values of the annotated type, numbers finite: a one-line ConfigError otherwise."""
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in valid:
            raise _unknown_key_error(section, key, sorted(valid))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{key} must be a finite number, got {value}")
        if not _fits(value, hints[key]):
            hint = hints[key]
            wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{section}.{key} must be {wanted}, got {value!r}")


def build_dataclass(cls, values: dict[str, Any], section: str):
    check_types(cls, values, section)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section}: {first_line(exc, with_type=False)}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"override {text!r}: key must start with one of {', '.join(SECTIONS)}")
    return parts, read_yaml(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if path.is_dir():
            raise ConfigError(f"--config {path} is a directory; give a YAML file, e.g. configs/quickstart.yaml")
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {first_line(exc, with_type=False)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {first_line(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(raw[section] or {}, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys to values")
    for override in overrides:
        parts, value = parse_override(override)
        node = raw.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    sections = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    _move_loss_keys(sections)
    check_types(PreferenceTrainingArguments, sections["training"], "training")  # ranges: when built, before loading
    return RunConfig(
        **{name: build_dataclass(cls, sections[name], name) for name, cls in SECTIONS.items() if name != "training"},
        training=sections["training"],
    )


def _move_loss_keys(sections: dict[str, dict]) -> None:
    """Older configs set the ORPO knobs under `training:`; they keep working, with one deprecation line."""
    for key in MOVED_TO_LOSS:
        if key not in sections["training"]:
            continue
        if key in sections["loss"]:
            raise ConfigError(f"training.{key} moved to loss.{key}; the config sets both: keep loss.{key}")
        log.warning("training.%s is deprecated: it moved to loss.%s (read from training: this time)", key, key)
        sections["loss"][key] = sections["training"].pop(key)
