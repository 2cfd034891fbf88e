"""FSDP under the transformers Trainer: on CPU processes too, wrapping the layers the model really has.

Two gaps of accelerate 1.15 that a user would otherwise meet as a silent fallback or a deep error:
- it turns FSDP on only for accelerator devices and quietly trains CPU processes as DDP; FSDP2 itself shards and
  trains over gloo, so a CPU run that asks for FSDP gets it (the same sharding, sharded checkpoints and resume as
  on GPUs, testable without one);
- transformer-based wrapping without `transformer_layer_cls_to_wrap` takes the model's `_no_split_modules`, which
  for VLMs names classes the model does not contain (LLaVA-NeXT lists CLIP's text embeddings) and stops the run;
  we keep the ones present, so one FSDP config fits every family.
"""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy


def configure_fsdp(accelerator, args, model) -> bool:
    """Finish the Trainer's FSDP setup for `model`; True when the run uses FSDP."""
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = _requested_plugin(args)
        if plugin is None:
            return False
        # PartialState too: every later AcceleratorState() copies its distributed_type
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        return False
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = layers_to_wrap(model)
    return True


def _requested_plugin(args) -> FullyShardedDataParallelPlugin | None:
    """The plugin of `training.fsdp`, or of `accelerate launch` with an FSDP config (its FSDP_* variables)."""
    if args.fsdp_plugin_args is not None:
        return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def layers_to_wrap(model) -> list[str]:
    """The classes of `model._no_split_modules` that occur in the model: its decoder and vision layers."""
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    return sorted({type(m).__name__ for m in model.modules()} & wanted)
