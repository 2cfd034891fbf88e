"""`vlm-orpo quantize`: a merged model -> a compressed-tensors checkpoint that vLLM serves, via llm-compressor.

Only the language model is quantized: the vision tower, the projector and lm_head stay in full precision.
Schemes that calibrate (GPTQ's Hessians, SmoothQuant's activation scales) see the model's real inputs: prompt +
chosen answer, with the image, from the same preference data that training reads.

llm-compressor pins a compressed-tensors release that vLLM does not, so it usually lives in a venv of its own
(`bash scripts/setup_quantize_env.sh`). When it is not importable here, the command re-runs itself there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from vlm_orpo.cards import write_quantized_card
from vlm_orpo.config import ConfigError, positive_int
from vlm_orpo.deploy.sidecar import env_python

log = logging.getLogger(__name__)

SCHEMES = {
    # name: (compressed-tensors preset, how), in llm-compressor's recipes' terms
    "W4A16": ("W4A16", "rtn"),  # int4 weights, group 128, round-to-nearest: no data
    "GPTQ-W4A16": ("W4A16", "gptq"),  # the same format, GPTQ-calibrated weights
    "W8A8": ("W8A8", "smoothquant+gptq"),  # int8 weights and dynamic per-token int8 activations
    "FP8_DYNAMIC": ("FP8_DYNAMIC", "rtn"),  # fp8 weights per channel, dynamic per-token fp8 activations
}
CHILD_ENV = "VLM_ORPO_QUANTIZE_CHILD"  # set in the re-run, so a Python without llm-compressor cannot loop
PYTHON_ENV = "VLM_ORPO_QUANTIZE_PYTHON"
SETUP_HINT = "run `bash scripts/setup_quantize_env.sh`"


def calibrates(scheme: str) -> bool:
    return SCHEMES[scheme][1] != "rtn"


HELP = 'quantize a merged model with llm-compressor (compressed-tensors)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="merged model directory (or hub name)")
    parser.add_argument("--scheme", required=True, choices=list(SCHEMES), help="quantization scheme")
    parser.add_argument("--out", required=True, help="output directory for the compressed-tensors checkpoint")
    parser.add_argument("--data", default="bundled", help="preference data for calibration (as `train` reads)")
    parser.add_argument("--split", default="train", help="split of --data to draw calibration samples from")
    parser.add_argument("--num-samples", type=positive_int, default=256, help="calibration samples (prompt + chosen)")
    parser.add_argument("--max-answer-tokens", type=positive_int, default=256, help="cap on the chosen answer's tokens")
    parser.add_argument("--seed", type=int, default=42, help="which calibration samples are drawn")
    parser.add_argument(
        "--python",
        default=os.environ.get(PYTHON_ENV),
        help=f"Python with llm-compressor to run in when it is not importable here (env {PYTHON_ENV}; "
        "default: .venv-quantize made by scripts/setup_quantize_env.sh)",
    )


def _to_argv(args) -> list[str]:
    argv = ["--model", args.model, "--scheme", args.scheme, "--out", args.out, "--data", args.data]
    argv += ["--split", args.split, "--num-samples", str(args.num_samples)]
    return argv + ["--max-answer-tokens", str(args.max_answer_tokens), "--seed", str(args.seed)]


def quantize_python(explicit: str | None, roots: list[Path] | None = None) -> str:
    """The Python of the quantize venv: --python, else .venv-quantize in the current folder or this checkout."""
    return env_python(".venv-quantize", explicit, SETUP_HINT, roots)


def run(args) -> None:
    if (Path(args.out) / "config.json").exists():
        raise ConfigError(f"--out {args.out} already holds a checkpoint; remove it or pick another directory")
    if importlib.util.find_spec("llmcompressor") is None:
        if os.environ.get(CHILD_ENV):
            raise ConfigError(f"{sys.executable} has no llm-compressor; {SETUP_HINT}")
        python = quantize_python(args.python)
        log.info("llm-compressor is not in this env: running in %s", python)
        cmd = [python, "-m", "vlm_orpo.cli", "quantize", *_to_argv(args)]
        code = subprocess.run(cmd, env={**os.environ, CHILD_ENV: "1"}).returncode
        if code:
            raise SystemExit(code)
        return
    start = time.perf_counter()
    out = quantize(args.model, args.scheme, args.out, args.data, args.split, args.num_samples,
                   args.max_answer_tokens, args.seed)
    print(f"{args.scheme} checkpoint (compressed-tensors) written to {out} in {time.perf_counter() - start:.0f}s")


def ignore_patterns(config) -> list[str]:
    """Modules left in full precision: the vision tower, the projector and lm_head, by the family's names.

    The patterns match the module's last name anywhere in the path, so checkpoints with vLLM-style names
    (`vision_tower.vision_model.*`) match too.
    """
    from vlm_orpo.modeling.families import family_for

    family = family_for(config)
    return ["re:.*lm_head$", *(f"re:.*{p.rsplit('.', 1)[-1]}\\..*" for p in (family.vision_tower, family.projector))]


def calibration_samples(processor, data: str, split: str, n: int, seed: int, max_answer_tokens: int) -> list[dict]:
    """n model inputs of prompt + chosen answer with the pair's image, drawn at random from the data.

    Only a random 2n rows are read and validated (bad rows are skipped and reported as in training), so a large
    dataset costs no more than the samples drawn from it.
    """
    import random

    import torch

    from vlm_orpo.data.packing import PairEncoder
    from vlm_orpo.data.sources import SkipReport, load_source, resolve_columns, select_rows
    from vlm_orpo.images import open_image

    dataset, base_dir = load_source(data, split)
    rng = random.Random(seed)
    candidates = rng.sample(range(len(dataset)), min(len(dataset), 2 * n))
    report = SkipReport()
    encoder = PairEncoder(processor, max_answer_tokens=max_answer_tokens)
    columns = resolve_columns(dataset.column_names, None)
    rows = select_rows(dataset, columns, split, report, base_dir, candidates, encoder.check)
    log.info("calibration %s", report.summary())
    if not len(rows):
        raise ConfigError(f"no usable calibration rows in {data!r} split {split!r}")
    samples = []
    for i in range(min(n, len(rows))):  # rows keep the random order they were drawn in
        row = dict(rows[i])
        row["image"] = open_image(row["image"], base_dir)  # relative image paths are relative to the data file
        pair = encoder.encode(row)
        ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), **pair.image_inputs})
    return samples


def build_recipe(scheme: str, ignore: list[str], language_model: str = "language_model") -> list:
    """llm-compressor modifiers for a scheme; `language_model` is the decoder's module name (SmoothQuant's scope)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    preset, how = SCHEMES[scheme]
    if how == "rtn":
        return [QuantizationModifier(targets="Linear", scheme=preset, ignore=ignore)]
    recipe = [GPTQModifier(targets="Linear", scheme=preset, ignore=ignore)]
    if how == "smoothquant+gptq":  # llm-compressor's int8 W8A8 recipe: move activation outliers into weights
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        from llmcompressor.modifiers.transform.smoothquant.utils import DEFAULT_SMOOTHQUANT_MAPPINGS

        def scope(pattern: str) -> str:  # llm-compressor's Llama/Mistral mappings, kept inside the decoder:
            return pattern.replace("re:.*", f"re:.*{language_model}\\..*", 1)  # the vision tower has q_proj too

        mappings = [[[scope(b) for b in m.balance_layers], scope(m.smooth_layers)]
                    for m in DEFAULT_SMOOTHQUANT_MAPPINGS]
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings, ignore=ignore))
    return recipe


def quantize(model: str, scheme: str, out: str, data: str = "bundled", split: str = "train",
             num_samples: int = 256, max_answer_tokens: int = 256, seed: int = 42) -> Path:
    """Quantize with llm-compressor's oneshot and save compressed; returns the output directory."""
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.config import ModelConfig
    from vlm_orpo.modeling.load import from_pretrained, load_processor, model_family

    cfg = ModelConfig(name_or_path=model)
    decoder = model_family(cfg).language_model  # an unsupported family fails before the weights load
    processor = load_processor(cfg)
    model_obj = from_pretrained(AutoModelForImageTextToText, cfg, dtype="auto")
    ignore = ignore_patterns(model_obj.config)
    language_model = decoder.rsplit(".", 1)[-1]
    kwargs = {}
    if calibrates(scheme):
        samples = calibration_samples(processor, data, split, num_samples, seed, max_answer_tokens)
        kwargs["dataset"] = DataLoader(samples, batch_size=None)  # one sample per step, tensors as built
        kwargs["num_calibration_samples"] = len(samples)
        # calibrate layer by layer through the decoder only (the vision tower just runs forward)
        kwargs["sequential_targets"] = model_obj.get_submodule(decoder)._no_split_modules
    oneshot(model=model_obj, processor=processor, recipe=build_recipe(scheme, ignore, language_model), **kwargs)
    out_dir = Path(out)
    model_obj.save_pretrained(out_dir, save_compressed=True)
    processor.save_pretrained(out_dir)
    add_ignore_patterns(out_dir / "config.json", ignore)
    preset, how = SCHEMES[scheme]
    calibration = ({"data": data, "split": split, "samples": kwargs["num_calibration_samples"], "seed": seed,
                    "max answer tokens": max_answer_tokens} if calibrates(scheme) else None)
    write_quantized_card(out_dir, model, scheme, preset, how, calibration)
    return out_dir


def add_ignore_patterns(config_path: Path, patterns: list[str]) -> None:
    """Put our patterns in the saved `ignore` list, beside the module names compressed-tensors wrote there.

    Those names are the checkpoint's keys (e.g. `vision_tower.encoder.layers.0.mlp.fc1`), which match neither
    transformers' in-memory names (`model.vision_tower...`: reloading would quantize the vision tower with
    made-up scales) nor vLLM's where they differ. Both read `re:` patterns, which match any naming.
    """
    config = json.loads(config_path.read_text())
    quant = config["quantization_config"]
    quant["ignore"] = [*patterns, *(name for name in quant.get("ignore", []) if name not in patterns)]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
