#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extras.
# torch is installed first from its pinned CPU build so no other package pulls a CUDA build.
# pip's output goes to .venv/install.log; its tail is printed if the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import sleep_pipeline, dagster, torch, bm25s, dagster_postgres, playwright, ray" >/dev/null 2>&1 || [ "${FORCE_INSTALL:-0}" = 1 ]; then
  log=.venv/install.log
  echo "installing into .venv (log: $log) ..."
  start=$SECONDS
  if ! { .venv/bin/pip install -q --upgrade pip \
         && .venv/bin/pip install -q "torch==2.13.0" \
         && .venv/bin/pip install -q -e ".[dev]"; } >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "install failed (full log: $log)" >&2
    exit 1
  fi
  echo "installed in $((SECONDS - start)) s"
fi
