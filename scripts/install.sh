#!/usr/bin/env bash
# Create .venv (if missing) and install vlm-orpo with the pinned versions we test with.
# torch goes first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLM_ORPO_VENV:-.venv}
EXTRAS=${1:-}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
