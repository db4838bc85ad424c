#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extras.
# torch is installed first from its pinned CPU build so no other package pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import sleep_pipeline, dagster, torch" >/dev/null 2>&1 || [ "${FORCE_INSTALL:-0}" = 1 ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
fi
