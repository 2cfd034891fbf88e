"""`vlm-orpo merge`: merged logits equal base + adapter, the checkpoint layout vLLM needs, prompts as trained."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from vlm_orpo.config import ConfigError, LoraSettings, ModelConfig
from vlm_orpo.deploy.merge import add_arguments, merge_adapter, rename_for_vllm, run


def random_adapter(base_dir: str, out, seed: int = 0, train_projector: bool = True):
    """A LoRA adapter with random B (PEFT initialises B to zero), so it changes the outputs."""
    from vlm_orpo.modeling.load import attach_adapter, load_base_model, model_family

    cfg = ModelConfig(name_or_path=base_dir, dtype="float32")
    model = attach_adapter(
        load_base_model(cfg, torch.device("cpu")),
        model_family(cfg),
        LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=train_projector),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter(asset_cache, tmp_path_factory):
    return random_adapter(asset_cache["tiny_model"], tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def merged(asset_cache, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args(["--adapter", str(adapter), "--out", str(out), "--overwrite"]))  # base from adapter
    return out


@pytest.fixture(scope="module")
def pair(asset_cache, tiny_processor):
    """One validation pair's model inputs, encoded as training encodes them."""
    from vlm_orpo.config import DataConfig
    from vlm_orpo.data.packing import PairEncoder, load_pairs

    encoder = PairEncoder(tiny_processor, max_answer_tokens=16)
    train, _, _ = load_pairs(DataConfig(source=asset_cache["validation"]), encoder)
    encoded = train[0]
    ids = torch.tensor([encoded.prompt_ids + encoded.chosen_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **encoded.image_inputs}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_logits_equal_base_plus_adapter(asset_cache, adapter, merged, pair):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"])
    base_logits = logits(base, pair)
    expected = logits(PeftModel.from_pretrained(base, str(adapter)), pair)
    got = logits(AutoModelForImageTextToText.from_pretrained(merged), pair)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter (and its trained projector) matter
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merged_checkpoint_is_safetensors_in_the_layout_vllm_loads(merged):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    assert {p.name for p in merged.iterdir()} >= {"config.json", "model.safetensors", "chat_template.jinja",
                                                 "processor_config.json", "tokenizer.json"}
    assert not list(merged.glob("*.bin")) and not list(merged.glob("adapter_*"))
    with safe_open(merged / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert not any("lora_" in k or "modules_to_save" in k for k in keys)
    _, info = AutoModelForImageTextToText.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # transformers reads vLLM's layout too


def test_served_chat_prompt_equals_the_trained_prompt(merged, tiny_processor):
    """vLLM tokenizes the rendered chat without special tokens; with BOS in the template that is training's prompt."""
    from transformers import AutoProcessor

    from vlm_orpo.data.packing import PairEncoder

    question = "What colour is the square?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    processor = AutoProcessor.from_pretrained(merged)
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>[INST]")
    served = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained_text = PairEncoder(tiny_processor).prompt_text(question)  # the bundled template, as training used it
    assert served == tiny_processor.tokenizer(trained_text)["input_ids"]
    assert PairEncoder(processor).prompt_text(question) == rendered  # no second BOS when re-encoded by training code


def test_evaluate_generates_from_a_merged_model_with_one_bos(merged):
    """The merged template writes BOS itself; `evaluate --generate` must not add a second one."""
    from transformers import AutoProcessor

    from vlm_orpo.data.packing import PairEncoder
    from vlm_orpo.evaluate import generate

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            self.input_ids = input_ids
            return input_ids

    processor = AutoProcessor.from_pretrained(merged)
    model = Recorder()
    generate(model, PairEncoder(processor), Image.new("RGB", (128, 96), "red"), "What colour?", 4)
    bos = processor.tokenizer.bos_token_id
    assert model.input_ids[0, 0] == bos and model.input_ids[0, 1] != bos


def test_rename_for_vllm_rewrites_shards_and_index_once(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"vision_tower.embeddings.w": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"language_model.model.norm.weight": torch.ones(2), "vision_tower.encoder.layers.0.w": torch.ones(1)},
              tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"vision_tower.embeddings.w": "model-00001-of-00002.safetensors",
                                            "language_model.model.norm.weight": "model-00002-of-00002.safetensors",
                                            "vision_tower.encoder.layers.0.w": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert rename_for_vllm(tmp_path, "llava") == 2
    assert rename_for_vllm(tmp_path, "llava") == 0  # already in vLLM's layout
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weight_map) == ["language_model.model.norm.weight", "vision_tower.vision_model.embeddings.w",
                                  "vision_tower.vision_model.encoder.layers.0.w"]
    for key, shard in weight_map.items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert key in f.keys() and f.metadata()["format"] == "pt"


def test_merge_refuses_bad_input(asset_cache, adapter, merged, tmp_path):
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="not empty"):
        merge_adapter(adapter, merged)
    with pytest.raises(ConfigError, match="model path not found"):
        merge_adapter(adapter, tmp_path / "out", base="/nonexistent/base")
    with pytest.raises(ConfigError, match="is a LoRA adapter, not a model"):
        merge_adapter(adapter, tmp_path / "out", base=str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="pass --model"):
        merge_adapter(orphan, tmp_path / "out")
