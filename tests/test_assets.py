"""Tests for the offline assets: tiny LLaVA-NeXT model and synthetic preference data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from vlm_orpo.assets import ASSETS_VERSION, cache_root, ensure_assets, score_answer
from vlm_orpo.assets.atomic import atomic_dir
from vlm_orpo.assets.synthetic import (
    COLOURS,
    DS_NAME,
    ORIGIN_DATASET,
    SHAPES,
    TASKS,
    build_synthetic_data,
    generate_split,
)
from vlm_orpo.assets.tiny_model import SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
COLUMNS = {"image", "question", "chosen", "rejected", "idx", "ds_name", "origin_dataset", "task", "target"}
# (width, height) -> number of <image> tokens / image feature vectors
EXPECTED_IMAGE_TOKENS = {(128, 128): 336, (128, 96): 268, (96, 128): 272}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-orpo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_ORPO_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def assets(cache_dir):
    t0 = time.perf_counter()
    paths = ensure_assets()
    elapsed = time.perf_counter() - t0
    return {**paths, "_build_seconds": elapsed}


@pytest.fixture(scope="session")
def processor(assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(assets["tiny_model"], local_files_only=True)


@pytest.fixture(scope="session")
def model(assets):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(assets["tiny_model"], local_files_only=True)
    return m.eval()


@pytest.fixture(scope="session")
def splits(assets, tmp_path_factory):
    import datasets

    return datasets.load_dataset(
        "parquet",
        data_files={"train": assets["train"], "validation": assets["validation"]},
        cache_dir=str(tmp_path_factory.mktemp("hf-datasets")),
    )


def _image(w, h, colour=(220, 20, 30)):
    from PIL import Image

    return Image.new("RGB", (w, h), colour)


def _colours(img) -> set[tuple[int, int, int]]:
    return {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


USER_MSG = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


# --------------------------------------------------------------------------- cache / ensure_assets


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_ORPO_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("VLM_ORPO_CACHE")
    assert cache_root() == Path.home() / ".cache" / "vlm-orpo"


def test_ensure_assets_layout_and_idempotent(assets, cache_dir):
    assert set(assets) - {"_build_seconds"} == {"tiny_model", "train", "validation"}
    for key in ("tiny_model", "train", "validation"):
        p = Path(assets[key])
        assert p.is_absolute() and p.exists(), p
        assert p.is_relative_to(cache_dir / ASSETS_VERSION)
    assert assets["_build_seconds"] < 60, assets["_build_seconds"]
    # No leftover temp dirs from the atomic build.
    assert sorted(p.name for p in (cache_dir / ASSETS_VERSION).iterdir()) == ["synthetic", "tiny-llava-next"]

    mtime = (Path(assets["tiny_model"]) / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_assets()
    assert time.perf_counter() - t0 < 1.0  # cached: nothing is rebuilt
    assert again == {k: v for k, v in assets.items() if k != "_build_seconds"}
    assert (Path(assets["tiny_model"]) / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_assets_waits_for_lock(tmp_path):
    """A builder blocks while another holder has the lock, then finds/builds the assets."""
    import threading

    from vlm_orpo.assets import _file_lock

    result = {}
    with _file_lock(tmp_path / f"{ASSETS_VERSION}.lock"):
        worker = threading.Thread(target=lambda: result.update(ensure_assets(tmp_path)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "ensure_assets did not wait for the lock"
        assert not (tmp_path / ASSETS_VERSION).exists()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert Path(result["tiny_model"], "model.safetensors").is_file() and Path(result["train"]).is_file()


def test_ensure_assets_removes_stale_temp_dirs_and_rebuilds_missing(tmp_path):
    base = tmp_path / ASSETS_VERSION
    stale = base / ".tiny-llava-next.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    paths = ensure_assets(tmp_path)
    assert not stale.exists()
    Path(paths["validation"]).unlink()  # a missing piece is rebuilt; the model is kept
    mtime = (Path(paths["tiny_model"]) / "model.safetensors").stat().st_mtime_ns
    assert ensure_assets(tmp_path) == paths and Path(paths["validation"]).is_file()
    assert (Path(paths["tiny_model"]) / "model.safetensors").stat().st_mtime_ns == mtime


def test_atomic_dir_replaces_only_a_finished_build(tmp_path):
    out = tmp_path / "built"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as scratch:
            (scratch / "new.txt").write_text("half")
            raise RuntimeError("build interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # the scratch folder is gone
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out) as scratch:
        (scratch / "new.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]
    assert [p.name for p in out.iterdir()] == ["new.txt"] and oct(out.stat().st_mode & 0o777) == "0o755"


def test_ensure_assets_concurrent_processes(tmp_path):
    """Two processes building into the same empty root at once both succeed, same result."""
    code = "import json, sys; from vlm_orpo.assets import ensure_assets; print(json.dumps(ensure_assets(sys.argv[1])))"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]
    assert Path(results[0]["tiny_model"], "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / ASSETS_VERSION).iterdir()) == ["synthetic", "tiny-llava-next"]


# --------------------------------------------------------------------------- tiny model


def test_model_loads_offline_in_fresh_process(assets, tmp_path):
    """AutoProcessor / AutoModelForImageTextToText load with HF_HUB_OFFLINE=1 and an empty HF cache."""
    code = f"""
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
d = {assets["tiny_model"]!r}
proc = AutoProcessor.from_pretrained(d)
model = AutoModelForImageTextToText.from_pretrained(d)
prompt = proc.apply_chat_template({USER_MSG!r}, add_generation_prompt=True)
inputs = proc(images=Image.new("RGB", (128, 128), (0, 0, 255)), text=prompt, return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
print(type(proc).__name__, type(model).__name__, tuple(out.logits.shape))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("LlavaNextProcessor LlavaNextForConditionalGeneration (1, ")
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())


def test_model_and_processor_classes(processor, model):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    assert isinstance(processor, LlavaNextProcessor)
    assert isinstance(model, LlavaNextForConditionalGeneration)
    cfg = model.config
    assert cfg.vision_config.model_type == "clip_vision_model"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.vision_config.hidden_size) == (64, 8, 64)
    assert cfg.vision_config.num_hidden_layers == 3 and cfg.vision_config.num_attention_heads == 4
    assert cfg.text_config.model_type == "mistral"
    tc = cfg.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (128, 2, 4, 2)
    assert tc.intermediate_size == 256 and tc.max_position_embeddings == 4096
    assert tc.tie_word_embeddings is False and cfg.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_grid_pinpoints == [[64, 128], [128, 64], [128, 128]]
    assert processor.image_processor.image_grid_pinpoints == cfg.image_grid_pinpoints
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())


def test_model_file_small(assets):
    size = (Path(assets["tiny_model"]) / "model.safetensors").stat().st_size
    assert 1_000_000 < size < 5_000_000, size


def test_tokenizer(processor, model):
    tok = processor.tokenizer
    assert len(tok) == VOCAB_SIZE == model.config.text_config.vocab_size
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    tc = model.config.text_config
    assert (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert tok.padding_side == "right"
    # The chat markers are single special tokens.
    for t in ("<image>", "[INST]", "[/INST]", "</s>"):
        assert tok.tokenize(t) == [t]
    # bos is prepended, like Mistral.
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok("hello", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    # Byte-level: arbitrary text round-trips, and dataset text is compact.
    text = "Ünïcödé text, emojis 🙂 and tabs\tare fine: zebra-quokka 42!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert len(tok("The shape is red.", add_special_tokens=False)["input_ids"]) <= 5
    # Right padding.
    batch = tok(["a", "a longer sentence"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_chat_template_rendering(processor):
    prompt = processor.apply_chat_template(USER_MSG, add_generation_prompt=True)
    assert prompt == "[INST] <image>\nWhat colour is the shape? [/INST]"
    assert processor.apply_chat_template(USER_MSG, add_generation_prompt=False) == prompt
    full = processor.apply_chat_template(
        USER_MSG + [{"role": "assistant", "content": [{"type": "text", "text": "The shape is red."}]}]
    )
    assert full == "[INST] <image>\nWhat colour is the shape? [/INST] The shape is red.</s>"
    # Plain string content, multi-turn, and the tokenizer carries the same template.
    conv = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = "[INST] Hi there [/INST] Hello.</s>[INST] Bye [/INST]"
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == expected
    assert processor.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == expected


def test_chat_template_assistant_mask(processor):
    tok = processor.tokenizer
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The shape is red."}]
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer).strip() == "The shape is red.</s>"
    assert answer[-1] == tok.eos_token_id


def _image_features(model, inputs):
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    return out.pooler_output


@pytest.mark.parametrize("size", list(EXPECTED_IMAGE_TOKENS))
def test_image_tokens_match_features(processor, model, size):
    import torch

    prompt = processor.apply_chat_template(USER_MSG, add_generation_prompt=True)
    inputs = processor(images=_image(*size), text=prompt, return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    feats = _image_features(model, inputs)
    assert len(feats) == 1
    assert n_tokens == feats[0].shape[0] == EXPECTED_IMAGE_TOKENS[size]
    assert inputs["image_sizes"].tolist() == [[size[1], size[0]]]  # (height, width)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_batched_mixed_sizes_forward_and_loss(processor, model):
    import torch

    conv = USER_MSG + [{"role": "assistant", "content": [{"type": "text", "text": "The shape is red."}]}]
    text = processor.apply_chat_template(conv)
    images = [_image(128, 128), _image(128, 96)]
    inputs = processor(images=images, text=[text, text], padding=True, return_tensors="pt")
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [336, 268]
    assert inputs["input_ids"][1, -1] == processor.tokenizer.pad_token_id  # right padding
    feats = _image_features(model, inputs)
    assert [f.shape[0] for f in feats] == counts
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_generate_runs(processor, model):
    import torch

    prompt = processor.apply_chat_template(USER_MSG, add_generation_prompt=True)
    inputs = processor(images=_image(96, 128), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_tiny_model_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    assert {"tokenizer.json", "model.safetensors", "config.json", "processor_config.json"} <= set(files_a)
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # A different seed changes the weights but not the tokenizer.
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert (c / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    # Rebuilding in place replaces the directory atomically and leaves no temp dirs.
    build_tiny_model(tmp_path / "a", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# --------------------------------------------------------------------------- synthetic data


def test_data_schema_and_counts(splits):
    import datasets

    assert splits["train"].num_rows == 1000 and splits["validation"].num_rows == 200
    for ds in splits.values():
        assert set(ds.column_names) == COLUMNS
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["idx"].dtype == "int64"
        assert set(ds["ds_name"]) == {DS_NAME} and set(ds["origin_dataset"]) == {ORIGIN_DATASET}
        assert set(ds["task"]) == set(TASKS)
        assert all(c != r for c, r in zip(ds["chosen"], ds["rejected"]))
    idx = list(splits["train"]["idx"]) + list(splits["validation"]["idx"])
    assert len(set(idx)) == len(idx) == 1200


def test_data_text_does_not_reveal_answer(splits):
    for name, ds in splits.items():
        assert Counter(ds["chosen"]) == Counter(ds["rejected"]), name
        # ... and that is not trivially true: answers vary.
        assert len(set(ds["chosen"])) > 20


def test_data_answers_score_consistently(splits):
    """chosen is right and rejected is wrong according to score_answer, on every row."""
    for ds in splits.values():
        for task, target, chosen, rejected in zip(ds["task"], ds["target"], ds["chosen"], ds["rejected"]):
            assert score_answer(task, target, chosen), (task, target, chosen)
            assert not score_answer(task, target, rejected), (task, target, rejected)


def test_data_targets(splits):
    ds = splits["train"]
    for task, target in zip(ds["task"], ds["target"]):
        if task == "colour":
            assert target in COLOURS
        elif task == "shape":
            assert target in SHAPES
        elif task == "count":
            assert target in {"1", "2", "3", "4"}
        else:
            size, colour, shape, on, bg = target.split()
            assert size in {"small", "large"} and colour in COLOURS and shape in SHAPES
            assert on == "on" and bg in {"white", "black", "gray"}


def test_data_images_are_rgb_png(splits):
    from PIL import Image

    raw = splits["validation"].cast_column("image", __import__("datasets").Image(decode=False))
    sizes = Counter()
    for row in raw.select(range(50)):
        data = row["image"]["bytes"]
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.mode == "RGB"
        sizes[img.size] += 1
    assert set(sizes) <= {(128, 128), (128, 96), (96, 128)}
    assert sizes[(128, 128)] > 25
    img = splits["train"][0]["image"]
    assert img.mode == "RGB" and len(_colours(img)) >= 2  # background + at least one shape colour


def test_colour_images_contain_the_target_colour(splits):
    """The image really shows what chosen says (pixel check on colour rows)."""
    ds = splits["validation"]
    checked = 0
    for i in range(ds.num_rows):
        if ds[i]["task"] != "colour":
            continue
        row = ds[i]
        pixels = _colours(row["image"])
        assert COLOURS[row["target"]] in pixels
        assert not any(COLOURS[c] in pixels for c in COLOURS if c != row["target"])
        checked += 1
    assert checked >= 20


def test_data_deterministic_and_seeded(tmp_path):
    a = generate_split(40, seed=0, split="train")
    b = generate_split(40, seed=0, split="train")
    c = generate_split(40, seed=1, split="train")
    assert a == b
    assert a["chosen"] != c["chosen"] or a["image"] != c["image"]
    pa = build_synthetic_data(tmp_path / "a", n_train=20, n_validation=10)
    pb = build_synthetic_data(tmp_path / "b", n_train=20, n_validation=10)
    assert pa["train"].read_bytes() == pb["train"].read_bytes()
    assert pa["validation"].read_bytes() == pb["validation"].read_bytes()
    with pytest.raises(ValueError):
        generate_split(3, seed=0, split="train")


# --------------------------------------------------------------------------- score_answer


@pytest.mark.parametrize(
    "task,target,text,expected",
    [
        ("colour", "red", "The shape is red.", True),
        ("colour", "red", "RED", True),
        ("colour", "red", "It is blue.", False),
        ("colour", "red", "It is red or maybe orange.", False),
        ("colour", "red", "I cannot tell.", False),
        ("colour", "red", "The shape is reddish.", False),
        ("shape", "circle", "It is a circle.", True),
        ("shape", "circle", "They are circles.", True),
        ("shape", "circle", "A circle next to a square.", False),
        ("shape", "triangle", "The shape is a square.", False),
        ("count", "3", "There are 3 shapes.", True),
        ("count", "3", "There are three shapes.", True),
        ("count", "3", "The number of shapes is Three.", True),
        ("count", "3", "There are 4 shapes.", False),
        ("count", "3", "Three or four shapes.", False),
        ("count", "1", "There is one shape.", True),
        ("count", "2", "I count 2 in total.", True),
        ("count", "2", "No idea.", False),
        ("description", "large red circle on white", "A large red circle on a white background.", True),
        ("description", "large red circle on white", "The image shows a small red circle.", True),
        ("description", "large red circle on white", "A large blue circle on a white background.", False),
        ("description", "large red circle on white", "A large red square on a white background.", False),
        ("description", "large red circle on white", "A red shape.", False),
    ],
)
def test_score_answer(task, target, text, expected):
    assert score_answer(task, target, text) is expected


def test_score_answer_unknown_task():
    with pytest.raises(ValueError):
        score_answer("size", "large", "It is large.")
