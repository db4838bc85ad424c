#!/usr/bin/env bash
# Set up (first run only) and run one sleep cycle on the embedded default, on CPU.
# Runs are recorded in .dagster_home, so `dagster dev` shows them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
mkdir -p "$DAGSTER_HOME"
.venv/bin/dagster job execute -m definitions -j sleep_cycle "$@"
.venv/bin/python -m sleep_pipeline.report
