#!/usr/bin/env bash
# Fresh machine -> trained adapter: install, build the bundled tiny model and data, train, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VLM_ORPO_VENV:-.venv}/bin/activate"
vlm-orpo train --config configs/quickstart.yaml --overwrite "$@"  # a rerun starts runs/quickstart over
