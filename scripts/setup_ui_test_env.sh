#!/usr/bin/env bash
# What the browser test of `vlm-orpo chat` needs: the ui extra (gradio, openai) in the main venv, Playwright's
# Python package, and Debian's Chromium. Playwright's own browser download cannot be used here, so the test
# drives /usr/bin/chromium (VLM_ORPO_CHROMIUM to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLM_ORPO_VENV:-.venv}
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
[ -x "$VENV/bin/python" ] || bash scripts/install.sh
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[ui]" "playwright==1.65.2"
chromium --version
