"""`vlm-orpo merge`: fold a LoRA adapter into its base model and save a plain checkpoint for serving.

Merged weights serve anywhere, at full speed, and are the only way to serve an adapter that also trained the
projector (PEFT's `modules_to_save`, which vLLM's LoRA cannot apply). The output is one directory with
safetensors weights, config, generation config, processor and chat template, loadable by both transformers
(`AutoModelForImageTextToText`) and vLLM.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

from vlm_orpo.cards import write_merged_card
from vlm_orpo.config import DTYPES, ConfigError, ModelConfig
from vlm_orpo.errors import first_line

log = logging.getLogger(__name__)

MERGE_RECORD = "vlm_orpo_merge.json"

# transformers 5.17 saves LLaVA's CLIP tower as `vision_tower.embeddings.*` / `vision_tower.encoder.*`, but
# vLLM's LLaVA loaders only accept the original hub layout `vision_tower.vision_model.*` and refuse the
# checkpoint otherwise. transformers reads both layouts, so we write the one both accept.
VLLM_KEY_RENAMES = {
    "llava": [(re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"), r"\1vision_model.")],
}


HELP = 'merge a LoRA adapter into its base model (loads in transformers and vLLM)'


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="base model: hub name, local directory or 'bundled' (default: the adapter's)")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (e.g. runs/x/best)")
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="dtype of the saved weights (default: the base checkpoint's)",
    )
    parser.add_argument("--revision", help="base model revision on the hub")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (off)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> None:
    out = merge_adapter(
        args.adapter, args.out, base=args.model, dtype=args.dtype, revision=args.revision,
        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )
    print(f"merged model: {out}")


def adapter_base(adapter: str | Path) -> str:
    """The base model recorded in the adapter's config by PEFT."""
    from vlm_orpo.modeling.load import adapter_config

    base = adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{Path(adapter) / 'adapter_config.json'} names no base model; pass --model")
    return base


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Load base + adapter, `merge_and_unload`, save weights (renamed for vLLM), processor and chat template."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.modeling.load import from_pretrained, load_processor, model_family

    adapter, out = Path(adapter).expanduser(), Path(out).expanduser()
    base = base or adapter_base(adapter)
    cfg = ModelConfig(name_or_path=base, revision=revision, trust_remote_code=trust_remote_code)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace its files")
    family = model_family(cfg)
    model = from_pretrained(AutoModelForImageTextToText, cfg, dtype=dtype)  # "auto" keeps the checkpoint's dtype
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as exc:  # wrong base, shape mismatch, not LoRA: one line for the user
        raise ConfigError(f"cannot merge adapter {adapter}: {first_line(exc)}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors only in transformers 5
    rename_for_vllm(out, family.name)
    processor = _adapter_processor(adapter, trust_remote_code) or load_processor(cfg)
    if template_adds_bos(processor):
        log.info("chat template now starts with the BOS token, as the training prompts did")
    processor.save_pretrained(out)  # tokenizer, image processor and chat_template.jinja
    record = {"base": cfg.name_or_path, "adapter": str(adapter.absolute()), "dtype": str(model.dtype)}
    (out / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_merged_card(out, adapter, cfg.name_or_path, revision, str(model.dtype))
    log.info("merged %s into %s -> %s", adapter, cfg.name_or_path, out)
    return out


def _adapter_processor(adapter: Path, trust_remote_code: bool):
    """The processor saved with the adapter by training, if any: it carries the chat template trained with."""
    from transformers import AutoProcessor

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    if not (adapter / "processor_config.json").is_file():
        return None
    allow_processors_without_torchvision()  # not load_processor: that refuses an adapter folder as a model
    return AutoProcessor.from_pretrained(adapter, trust_remote_code=trust_remote_code)


def template_adds_bos(processor) -> bool:
    """Put BOS into the chat template when the tokenizer adds one but the template does not write it.

    Training tokenizes the rendered prompt with special tokens, so the model saw `<s>[INST] ...`. vLLM's chat
    endpoint (like `apply_chat_template(tokenize=True)`) tokenizes the rendered chat *without* special tokens,
    so a template without BOS would serve prompts the model never saw. Returns whether it changed the template.
    """
    tokenizer, template = processor.tokenizer, processor.chat_template
    bos = tokenizer.bos_token
    if not template or bos is None or tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return False
    probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    if processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False).startswith(bos):
        return False
    processor.chat_template = tokenizer.chat_template = "{{- bos_token -}}" + template
    return True


def vllm_name(key: str, family: str) -> str:
    """The tensor name vLLM loads for a checkpoint tensor name."""
    for pattern, replacement in VLLM_KEY_RENAMES.get(family, []):
        key = pattern.sub(replacement, key)
    return key


def rename_for_vllm(model_dir: str | Path, family: str) -> int:
    """Rewrite tensor names in every safetensors shard (and the index) to the layout vLLM loads. Returns count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    rename = functools.partial(vllm_name, family=family)
    renamed = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata() or {}
            changed = sum(rename(k) != k for k in f.keys())
            if not changed:
                continue
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        renamed += changed
        save_file(tensors, shard, metadata={**metadata, "format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
    return renamed
