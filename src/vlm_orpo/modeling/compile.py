"""torch.compile of the language model's decoder layers ("regional" compilation), for the CUDA fast path.

Each decoder layer is compiled in place with `nn.Module.compile`, so parameter names, PEFT wrappers and
gradient checkpointing (which wraps the layer's `__call__`) are unchanged. All layers run the same code, so
dynamo compiles the layer once and reuses the graph for the others (parameters are graph inputs), which
keeps compile time to one layer's worth instead of the whole model's. The vision tower, the image-feature
merge and the LM head stay eager: they run once per step, on shapes that change with the image grid.
"""

from __future__ import annotations

import torch

from vlm_orpo.modeling.families import family_for


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers (`<family.language_model>.layers`), through DDP/PEFT wrappers."""
    from vlm_orpo.modeling.shared_prefix import unwrap

    hf = unwrap(model)
    family = family_for(hf.config)
    layers = hf.get_submodule(f"{family.language_model}.layers")
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{family.language_model}.layers is not a non-empty ModuleList")
    return layers


def compile_decoder_layers(model, **compile_kwargs) -> int:
    """Compile every decoder layer in place; returns how many were compiled.

    `compile_kwargs` go to `torch.compile` (e.g. `mode="max-autotune-no-cudagraphs"`, `dynamic=True`). The
    default lets dynamo specialise on the first sequence length and mark it dynamic once a second one shows
    up, so a training run with varying row lengths compiles twice, not once per length.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)

