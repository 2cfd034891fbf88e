"""`vlm-orpo train --dry-run --accelerate-config FILE`: the file `accelerate launch` will read, checked against
the run offline, so a mistake costs a line here and not a cluster start.

DeepSpeed cannot run on this CPU-only project's machines (it is not even installed in the test environment),
and FSDP or DDP settings that do not fit the model or the training section fail only at the first step on the
GPUs. This reads the same YAML (accelerate's `config_file` layout), names the engine, the processes and the
global batch, and turns every mismatch it can see into a one-line `ConfigError`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml

from vlm_orpo.errors import ConfigError, first_line
from vlm_orpo.fsdp import layers_to_wrap

ENGINES = {"NO": "one process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP on CPU processes", "FSDP": "FSDP",
           "DEEPSPEED": "DeepSpeed"}
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
FSDP_STATE_DICTS = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
FSDP_WRAPS = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def check_accelerate_config(path: str | Path, args, model=None) -> list[str]:
    """The plan lines of accelerate config `path` for training arguments `args` (and `model`, on the meta
    device, when its config was reachable); a ConfigError for the first mistake found."""
    path = Path(path)
    config = _read(path)
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind not in ENGINES:
        raise ConfigError(f"{path}: distributed_type {kind!r} is not one of {', '.join(ENGINES)}")
    processes = _positive_int(config, "num_processes", 1, path)
    machines = _positive_int(config, "num_machines", 1, path)
    if processes % machines:
        raise ConfigError(f"{path}: num_processes {processes} (all machines together) is not a multiple of "
                          f"num_machines {machines}")
    precision = str(config.get("mixed_precision", "no"))
    if precision not in MIXED_PRECISION:
        raise ConfigError(f"{path}: mixed_precision {precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    trained = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if trained is not None and precision not in ("no", trained):
        raise ConfigError(f"{path}: mixed_precision {precision} but training.{trained} is true: set both alike")

    engine = ENGINES[kind]
    details = []
    if kind == "FSDP":
        engine, details = _check_fsdp(config.get("fsdp_config") or {}, args, model, path)
    elif kind == "DEEPSPEED":
        engine, details = _check_deepspeed(config.get("deepspeed_config") or {}, args, path)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    where = f"{processes} processes on {machines} machine{'s' if machines > 1 else ''}"
    lines = [f"launch: {engine}, {where}, mixed precision {precision}; "
             f"{args.per_device_train_batch_size} pairs x accumulation {args.gradient_accumulation_steps} x "
             f"{processes} processes = {per_step} pairs a step", *details]
    if machines > 1:
        lines.append("multi-node: run the same command on every machine with --machine_rank 0..."
                     f"{machines - 1} and --main_process_ip of machine 0")
    return lines


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"accelerate config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc, with_type=False)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: an accelerate config is a mapping (see `accelerate config`)")
    return config


def _positive_int(config: dict, key: str, default: int, path: Path) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _check_fsdp(fsdp: dict, args, model, path: Path) -> tuple[str, list[str]]:
    version = fsdp.get("fsdp_version", 1)
    if version not in (1, 2):
        raise ConfigError(f"{path}: fsdp_version must be 1 or 2, got {version!r}")
    state_dict = str(fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT"))
    if state_dict not in FSDP_STATE_DICTS:
        raise ConfigError(f"{path}: fsdp_state_dict_type must be one of {', '.join(FSDP_STATE_DICTS)} under FSDP2, "
                          f"got {state_dict!r}")
    wrap = str(fsdp.get("fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"))
    if wrap not in FSDP_WRAPS:
        raise ConfigError(f"{path}: fsdp_auto_wrap_policy must be one of {', '.join(FSDP_WRAPS)}, got {wrap!r}")
    if fsdp.get("fsdp_activation_checkpointing") and args.gradient_checkpointing:
        raise ConfigError(f"{path}: fsdp_activation_checkpointing and training.gradient_checkpointing are both on; "
                          "keep one (the Trainer refuses both)")
    details = [f"checkpoints: {state_dict.lower().replace('_', ' ')}; best/ and final/ hold the full weights"]
    if wrap == "TRANSFORMER_BASED_WRAP" and model is not None:
        classes = {type(m).__name__ for m in model.modules()}
        named = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
        names = [n.strip() for n in str(named).split(",") if n.strip()] if named else layers_to_wrap(model)
        missing = [n for n in names if n not in classes]
        if missing:
            raise ConfigError(f"{path}: fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
                              f"{type(model).__name__} does not contain; its layers: "
                              f"{', '.join(layers_to_wrap(model)) or 'none declared'} (or leave the key out: "
                              "vlm-orpo wraps the model's own layers)")
        details.append(f"wraps: {', '.join(names) or 'the whole model as one unit'}")
    return f"FSDP{version}", details


def _check_deepspeed(deepspeed: dict, args, path: Path) -> tuple[str, list[str]]:
    if "deepspeed_config_file" in deepspeed:
        file = Path(deepspeed["deepspeed_config_file"])
        if not file.is_file():
            raise ConfigError(f"{path}: deepspeed_config_file not found: {file}")
        return f"DeepSpeed ({file})", _deepspeed_availability()
    stage = deepspeed.get("zero_stage", 2)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    for key, ours, knob in (("gradient_accumulation_steps", args.gradient_accumulation_steps,
                             "training.gradient_accumulation_steps"),
                            ("gradient_clipping", args.max_grad_norm, "training.max_grad_norm")):
        value = deepspeed.get(key, "auto")
        if value != "auto" and value != ours:
            raise ConfigError(f"{path}: deepspeed_config.{key} is {value} but {knob} is {ours}: DeepSpeed refuses "
                              f"the mismatch at the first step; leave {key} out (the Trainer fills it in) or set both")
    for key in ("offload_optimizer_device", "offload_param_device"):
        device = str(deepspeed.get(key, "none"))
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(OFFLOAD_DEVICES)}, got {device!r}")
    return f"DeepSpeed ZeRO-{stage}", _deepspeed_availability()


def _deepspeed_availability() -> list[str]:
    """DeepSpeed trains on CUDA GPUs only: say so where the plan is checked elsewhere."""
    missing = [what for what, ok in (("deepspeed is not installed", importlib.util.find_spec("deepspeed")),
                                     ("no CUDA GPU", torch.cuda.is_available())) if not ok]
    return [f"DeepSpeed checked, not runnable here ({', '.join(missing)}): run the command on a GPU machine"] \
        if missing else []
