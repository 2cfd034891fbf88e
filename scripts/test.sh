#!/usr/bin/env bash
# Fresh machine -> test results: install with the dev extras, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. "${VLM_ORPO_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
