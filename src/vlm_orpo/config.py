"""Typed run configuration: a YAML file with data, model, lora and training sections, plus `key=value` overrides.

The training section is `OrpoTrainingArguments`, a transformers `TrainingArguments` with ORPO's fields added
(TRL's ORPOConfig idiom), so every usual Trainer option works and is validated by the library.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from vlm_orpo.data.sources import MAX_IMAGE_PIXELS
from vlm_orpo.errors import ConfigError, first_line

BUNDLED = "bundled"


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
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column, e.g. {"question": "prompt"}
    where: dict[str, Any] = field(default_factory=dict)  # keep rows whose column is one of these values
    max_answer_tokens: int = 128
    max_prompt_tokens: int | None = None  # longer prompts (image tokens included) are skipped, never cut
    max_tokens_per_row: int | None = None  # pack several pairs per row up to this length; None = a pair per row
    eval_limit: int | None = None  # score at most this many validation pairs
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped (counted), never decoded

    def __post_init__(self):
        _check(0 < self.subset_fraction <= 1, f"data.subset_fraction must be in (0, 1], got {self.subset_fraction}")
        _check(0 <= self.validation_fraction < 1, "data.validation_fraction must be in [0, 1)")
        for name in ("max_answer_tokens", "max_prompt_tokens", "max_tokens_per_row", "eval_limit", "max_image_pixels"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name} must be positive, got {value}")


@dataclass
class ModelConfig:
    name_or_path: str = BUNDLED  # "bundled" = the tiny LLaVA-NeXT built by `vlm-orpo assets`
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_backend: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex
    compile_layers: bool | str = "auto"  # torch.compile each decoder layer: auto = on CUDA only
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"model.dtype {self.dtype!r} is not valid")
        _check(self.attn_backend in ("auto", "sdpa", "flex"), f"model.attn_backend {self.attn_backend!r} is not valid")
        _check(self.compile_layers in (True, False, "auto"), "model.compile_layers must be true, false or auto")


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
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class OrpoTrainingArguments(TrainingArguments):
    """TrainingArguments plus ORPO's knobs."""

    orpo_lambda: float = field(default=0.1, metadata={"help": "weight of the odds-ratio loss (TRL's beta)"})
    sft_on_prompt: bool = field(default=False, metadata={"help": "add the prompt's text tokens to the SFT loss"})
    best_metric: str = field(default="loss", metadata={"help": "eval metric that picks best/: loss or accuracy"})
    output_dir: str = field(default="runs/vlm-orpo")
    remove_unused_columns: bool = False
    report_to: Any = "none"

    def __post_init__(self):
        _check(self.learning_rate > 0, f"training.learning_rate must be positive, got {self.learning_rate}")
        _check(self.orpo_lambda >= 0, f"training.orpo_lambda must be >= 0, got {self.orpo_lambda}")
        _check(self.best_metric in ("loss", "accuracy"), "training.best_metric must be loss or accuracy")
        _check(self.per_device_train_batch_size > 0, "training.per_device_train_batch_size must be positive")
        _check(self.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps must be positive")
        super().__post_init__()


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: dict[str, Any] = field(default_factory=dict)  # kwargs of OrpoTrainingArguments

    @property
    def output_dir(self) -> str:
        return self.training.get("output_dir") or OrpoTrainingArguments.__dataclass_fields__["output_dir"].default

    def training_args(self, **overrides) -> OrpoTrainingArguments:
        return build_dataclass(OrpoTrainingArguments, {**self.training, **overrides}, "training")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "lora": LoraSettings, "training": OrpoTrainingArguments}


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (argparse turns the error into one usage line)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    return isinstance(value, origin or hint)


def build_dataclass(cls, values: dict[str, Any], section: str):
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in valid:
            raise _unknown_key_error(section, key, sorted(valid))
    if cls is not OrpoTrainingArguments:  # TrainingArguments converts and checks its own values
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _fits(value, hints[key]):
                hint = hints[key]
                wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise ConfigError(f"{section}.{key} must be {wanted}, got {value!r}")
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
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {first_line(exc, with_type=False)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    for override in overrides:
        parts, value = parse_override(override)
        node = raw.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    training = raw.get("training") or {}
    for key in training:  # fail early on typos; values are checked when the arguments are built
        if key not in {f.name for f in dataclasses.fields(OrpoTrainingArguments)}:
            raise _unknown_key_error("training", key, sorted(f.name for f in dataclasses.fields(OrpoTrainingArguments)))
    return RunConfig(
        data=build_dataclass(DataConfig, raw.get("data") or {}, "data"),
        model=build_dataclass(ModelConfig, raw.get("model") or {}, "model"),
        lora=build_dataclass(LoraSettings, raw.get("lora") or {}, "lora"),
        training=dict(training),
    )


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(
        {
            "data": dataclasses.asdict(config.data),
            "model": dataclasses.asdict(config.model),
            "lora": dataclasses.asdict(config.lora),
            "training": config.training,
        },
        sort_keys=False,
    )
