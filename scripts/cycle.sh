#!/usr/bin/env bash
# Set up (first run only) and run one sleep cycle on the embedded default, on CPU:
# data hygiene -> Learn (DeepSpeed, 2 ranks) -> Gate (lm-eval suites, capability + safety checks) -> release.
# Runs are recorded in .dagster_home, so `dagster dev` shows them afterwards. Extra arguments go to
# `dagster job execute` (e.g. -c run_config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
mkdir -p "$DAGSTER_HOME"
# the project's instance settings (one model-loading run at a time, one release step at a time)
[ -s "$DAGSTER_HOME/dagster.yaml" ] || cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"
start=$(date +%s)
status=0
.venv/bin/dagster job execute -m definitions -j sleep_cycle "$@" || status=$?
.venv/bin/python -m sleep_pipeline.report
echo "  wall time: $(( $(date +%s) - start )) s (job exit status $status)"
exit $status
