#!/usr/bin/env bash
# What the browser tests of `vlm-orpo chat` need: the ui extra (gradio, openai) and Playwright's Python package in
# the main venv, and Debian's Chromium. Playwright's own browser download does not work here, so the tests drive
# /usr/bin/chromium (VLM_ORPO_CHROMIUM to use another).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLM_ORPO_VENV:-.venv}
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
[ -x "$VENV/bin/python" ] || bash scripts/install.sh
flock .editable-install.lock "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[ui]" \
    "gradio==6.31.0" "openai==3.51.0" "playwright==1.65.2"
chromium --version
