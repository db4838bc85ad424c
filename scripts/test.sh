#!/usr/bin/env bash
# Set up (first run only) and run the test suite: unit tests plus in-process materialisation of
# every asset. The slow end-to-end tier (`-m slow`) runs with: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m "not slow" "$@"
