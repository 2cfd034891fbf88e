"""`vlm-orpo quantize`: what is left in full precision, calibration inputs, finding the quantize env, and
end-to-end W8A8 and FP8_DYNAMIC runs on the bundled tiny LLaVA-NeXT.

The end-to-end tests run llm-compressor where it is importable, else in .venv-quantize (made by
`bash scripts/setup_quantize_env.sh`), exactly as the command does. Without either they skip, unless
VLM_ORPO_REQUIRE_QUANTIZE is set (CI sets it after running the script), where they fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_orpo.deploy import quantize
from vlm_orpo.config import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quantize.add_arguments(parser)
    return parser.parse_args(list(argv))


def ignored(name: str, patterns: list[str]) -> bool:
    """compressed-tensors' rule: a `re:` target matches with re.match, anything else by equality."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


def test_vision_tower_projector_and_lm_head_stay_full_precision(asset_cache):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(asset_cache["tiny_model"])
    patterns = quantize.ignore_patterns(config)
    model = AutoModelForImageTextToText.from_config(config)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    kept = [name for name in linears if ignored(name, patterns)]
    quantized = [name for name in linears if not ignored(name, patterns)]
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized)
    assert "lm_head" in kept and any(".vision_tower." in n for n in kept) and any("projector" in n for n in kept)
    # checkpoint and vLLM names of the same modules match too
    for name in ("language_model.lm_head", "vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj",
                 "vision_tower.encoder.layers.0.mlp.fc1", "multi_modal_projector.linear_1"):
        assert ignored(name, patterns), name
    assert not ignored("language_model.model.layers.0.self_attn.qkv_proj", patterns)


def test_calibration_samples_are_prompt_plus_chosen_with_the_image(asset_cache, tiny_processor):
    from vlm_orpo.data.packing import PairEncoder
    from vlm_orpo.data.sources import prepare_data

    samples = quantize.calibration_samples(tiny_processor, asset_cache["train"], "train", 5, 0, 64)
    assert len(samples) == 5
    encoder = PairEncoder(tiny_processor, max_answer_tokens=64)
    image_token = tiny_processor.tokenizer.convert_tokens_to_ids(tiny_processor.image_token)
    rows = prepare_data(asset_cache["train"]).train
    chosen_endings = {tuple(encoder.answer_ids(rows[i]["question"], rows[i]["chosen"])) for i in range(len(rows))}
    for sample in samples:
        ids = sample["input_ids"][0].tolist()
        assert sample["input_ids"].shape == sample["attention_mask"].shape
        assert "pixel_values" in sample and "image_sizes" in sample
        assert image_token in ids and ids[-1] == tiny_processor.tokenizer.eos_token_id
        assert any(tuple(ids[-len(c):]) == c for c in chosen_endings)  # the prompt, then a chosen answer
    again = quantize.calibration_samples(tiny_processor, asset_cache["train"], "train", 5, 0, 64)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again, strict=True))  # seeded


def test_finding_the_quantize_env(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="setup_quantize_env.sh"):
        quantize.quantize_python(None, roots=[tmp_path])
    with pytest.raises(ConfigError, match="not found"):
        quantize.quantize_python(str(tmp_path / "nope" / "python"), roots=[])
    python = tmp_path / ".venv-quantize" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    assert quantize.quantize_python(None, roots=[tmp_path]) == str(python)
    monkeypatch.setenv(quantize.PYTHON_ENV, "/opt/q/bin/python")
    assert parse("--model", "m", "--scheme", "W8A8", "--out", "o").python == "/opt/q/bin/python"
    # inside the re-run, a Python without llm-compressor is an error, not another re-run
    if importlib.util.find_spec("llmcompressor") is None:
        monkeypatch.setenv(quantize.CHILD_ENV, "1")
        with pytest.raises(ConfigError, match="no llm-compressor"):
            quantize.run(parse("--model", "m", "--scheme", "W8A8", "--out", "o"))


def test_arguments_survive_the_rerun():
    args = parse("--model", "m", "--scheme", "GPTQ-W4A16", "--out", "o", "--data", "d.jsonl", "--split", "s",
                 "--num-samples", "7", "--max-answer-tokens", "9", "--seed", "3")
    again = parse(*quantize._to_argv(args))
    assert {k: v for k, v in vars(again).items() if k != "python"} == {
        k: v for k, v in vars(args).items() if k != "python"}
    with pytest.raises(SystemExit):
        parse("--model", "m", "--scheme", "INT3", "--out", "o")
    with pytest.raises(SystemExit):  # argparse: "--num-samples: must be at least 1"
        parse("--model", "m", "--scheme", "W8A8", "--out", "o", "--num-samples", "0")


def test_never_overwrites_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        quantize.run(parse("--model", "m", "--scheme", "FP8_DYNAMIC", "--out", str(tmp_path)))


# ---------------------------------------------------------------- end to end


def quantize_env() -> str | None:
    """The Python that runs llm-compressor: this one, or the quantize venv's; None if neither."""
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    try:
        return quantize.quantize_python(os.environ.get(quantize.PYTHON_ENV))
    except ConfigError:
        return None


@pytest.fixture(scope="module")
def quantize_python():
    python = quantize_env()
    if python is None:
        message = "llm-compressor not available: bash scripts/setup_quantize_env.sh"
        if os.environ.get("VLM_ORPO_REQUIRE_QUANTIZE"):
            pytest.fail(f"VLM_ORPO_REQUIRE_QUANTIZE is set but {message}")
        pytest.skip(message)
    return python


def vllm_named_copy(model_dir: str, out: Path) -> Path:
    """The tiny model with vision keys as vLLM names them (`vision_tower.vision_model.*`), as a merge may write."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


RELOAD = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
ref = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
model = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
processor = AutoProcessor.from_pretrained(sys.argv[2])
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.new("RGB", (80, 60), (200, 40, 40))], text=[prompt], return_tensors="pt")
with torch.no_grad():
    a, b = ref(**inputs).logits, model(**inputs).logits
print(json.dumps({
    "rel_err": ((a - b).norm() / a.norm()).item(),
    "quantized": sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)),
    "vision_same": all(torch.equal(p, q) for p, q in zip(ref.model.vision_tower.parameters(),
                                                         model.model.vision_tower.parameters())),
    "projector_same": all(torch.equal(p, q) for p, q in zip(ref.model.multi_modal_projector.parameters(),
                                                            model.model.multi_modal_projector.parameters())),
}))
"""


# (scheme, naming of the input checkpoint): "tiny" is the bundled model dir itself; "vllm" is a copy with vision
# keys as vLLM names them (`vision_tower.vision_model.*`), as `merge` writes them for serving
CASES = [("W8A8", "tiny"), ("FP8_DYNAMIC", "vllm"), ("W8A8", "vllm")]
WEIGHT_DTYPE = {"W8A8": "I8", "FP8_DYNAMIC": "F8_E4M3"}


@pytest.fixture(scope="module")
def quantized(quantize_python, asset_cache, tmp_path_factory):
    """Run `python -m vlm_orpo.cli quantize` once per case; returns (input dir, output dir, stderr)."""
    done: dict[tuple[str, str], tuple[str, Path, str]] = {}

    def get(scheme: str, naming: str) -> tuple[str, Path, str]:
        if (scheme, naming) not in done:
            root = tmp_path_factory.mktemp(f"{scheme}-{naming}")
            model_dir = asset_cache["tiny_model"]
            if naming == "vllm":
                model_dir = str(vllm_named_copy(model_dir, root / "merged"))
            out = root / "quantized"
            cmd = [sys.executable, "-m", "vlm_orpo.cli", "quantize", "--model", model_dir, "--scheme", scheme,
                   "--out", str(out), "--data", asset_cache["train"], "--num-samples", "8",
                   "--max-answer-tokens", "32"]
            run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
            assert run.returncode == 0, run.stderr[-4000:]
            assert f"{scheme} checkpoint (compressed-tensors) written to {out}" in run.stdout
            done[scheme, naming] = (model_dir, out, run.stderr)
        return done[scheme, naming]

    return get


ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
@pytest.mark.parametrize("scheme, naming", CASES)
def test_quantize_end_to_end(scheme, naming, quantized, quantize_python):
    from safetensors import safe_open
    from transformers import AutoConfig

    weight_dtype = WEIGHT_DTYPE[scheme]
    model_dir, out, log = quantized(scheme, naming)
    calibrated = re.search(r"calibration data: kept train 16; no rows skipped", log)  # 2 x 8 rows read
    assert bool(calibrated) == quantize.calibrates(scheme)

    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["quantization_status"] == "compressed"
    assert quant["format"] == {"W8A8": "int-quantized", "FP8_DYNAMIC": "float-quantized"}[scheme]
    assert set(quantize.ignore_patterns(AutoConfig.from_pretrained(model_dir))) <= set(quant["ignore"])
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja", "recipe.yaml"):
        assert (out / name).exists(), name

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    lm_weights = [k for k in keys if re.search(r"language_model\.model\.layers\.\d+\..*_proj\.weight$", k)]
    assert len(lm_weights) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for key in lm_weights:
        assert dtypes[key] == weight_dtype and key.replace(".weight", ".weight_scale") in keys, key
    vision_prefix = "vision_tower.vision_model." if naming == "vllm" else "vision_tower.encoder."
    kept = [k for k in keys if k.startswith((vision_prefix, "multi_modal_projector.", "language_model.lm_head"))]
    assert kept and all(dtypes[k] == "F32" and not k.endswith("_scale") for k in kept)

    # it loads back (transformers + compressed-tensors in the quantize env) and computes what the original does
    run = subprocess.run([quantize_python, "-c", RELOAD, model_dir, str(out)], capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["quantized"]) == 14 and all(".language_model.layers." in n for n in report["quantized"])
    assert report["vision_same"] and report["projector_same"]
    assert report["rel_err"] < 0.1, report  # logits: quantization noise, not a different model


def serve_python() -> str | None:
    """A Python with vLLM (the serving env, compressed-tensors 0.17): VLM_ORPO_SERVE_PYTHON or .venv-serve."""
    repo = Path(__file__).resolve().parents[1]
    python = os.environ.get("VLM_ORPO_SERVE_PYTHON") or str(repo / ".venv-serve" / "bin" / "python")
    if not Path(python).exists():
        return None
    found = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    return python if found.returncode == 0 else None


VLLM_CHAT = r"""
import base64, io, sys
from PIL import Image

if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], max_model_len=1024, enforce_eager=True, max_num_seqs=1,
              limit_mm_per_prompt={"image": 1})
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))
    print("TOKENS", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC"])
def test_vllm_serves_the_checkpoint(scheme, quantized, tmp_path):
    """Written with compressed-tensors 0.19, read by vLLM 0.32 (0.17): the quantized kernels run."""
    python = serve_python()
    if python is None:
        if os.environ.get("VLM_ORPO_REQUIRE_SERVE"):
            pytest.fail("VLM_ORPO_REQUIRE_SERVE is set but there is no vLLM env")
        pytest.skip("no vLLM env (VLM_ORPO_SERVE_PYTHON or .venv-serve made by the serve setup)")
    _, out, _ = quantized(scheme, "vllm")  # vLLM reads vision keys as `vision_tower.vision_model.*` only
    script = tmp_path / "vllm_chat.py"
    script.write_text(VLLM_CHAT)
    env = {**ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([python, str(script), str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "TOKENS 4" in run.stdout
    kernel = {"W8A8": "CompressedTensorsW8A8Int8", "FP8_DYNAMIC": "CompressedTensorsW8A8Fp8"}[scheme]
    assert kernel in run.stdout + run.stderr  # vLLM read the quantization config, not plain weights
