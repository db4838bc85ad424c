#!/usr/bin/env bash
# Recreate what scripts/gpu_check.sh carries to the GPU machine, which has no network: .whl/ (the packages
# the workers import that the machine's Python 3.12 lacks, as x86-64 wheels at this project's versions)
# and .gpu/smollm2/ (SmolLM2-135M-Instruct's config, tokenizer and chat template, not its weights: the
# check initialises the model at random). Both are listed in .git/info/exclude, so they never get committed.
#
#   scripts/gpu_wheels.sh [MODEL_DIR]   default: ${SLEEP_PIPELINE_HOME:-.sleep_pipeline}/models/smollm2-135m-instruct
#   DEST=/tmp/copy scripts/gpu_wheels.sh  writes DEST/.whl and DEST/.gpu instead of the repository's
#
# MODEL_DIR is an imported model: .venv/bin/sleep-pipeline import "$(scripts/get_smollm2.sh)". The wheels are
# downloaded (PyPI) beside the old .whl/ and replace it only when all of them are there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dest=${DEST:-$root}
model=${1:-${SLEEP_PIPELINE_HOME:-.sleep_pipeline}/models/smollm2-135m-instruct}
PY=${PYTHON:-$root/.venv/bin/python}
WHEELS=(
  annotated_types==0.8.0 datasets==5.2.0 dill==0.4.1 duckdb==2.0.0 fsspec==2026.9.0 hjson==3.1.0
  multiprocess==0.70.19 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 regex==2026.11.19
  transformers==5.23.0 trl==1.16.0 typing_extensions==4.16.0 typing_inspection==0.4.5
)
DEEPSPEED=deepspeed==0.19.8  # an sdist only on PyPI: built here into a pure wheel, its ops compiled on use
MODEL_FILES=(config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja)

for f in config.json tokenizer.json; do
  [ -f "$model/$f" ] || { echo "error: $model/$f is missing (import SmolLM2 first, see the top of $0)" >&2; exit 1; }
done

mkdir -p "$dest"
new=$(mktemp -d "$dest/.whl.new-XXXXXX")
trap 'rm -rf "$new"' EXIT
# --no-deps: the list above is the whole set; the machine has the rest (torch, accelerate, tokenizers, ...)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$new" "${WHEELS[@]}"
# no build isolation: setup.py imports the venv's torch; DS_BUILD_OPS=0 leaves every op to be built on use;
# no cache: pip would reuse the venv's own deepspeed build, made for DS_ACCELERATOR=cpu
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation "$DEEPSPEED" -w "$new"
count=$(ls "$new"/*.whl | wc -l)
[ "$count" -eq $(( ${#WHEELS[@]} + 1 )) ] || { echo "error: $count wheels in $new, expected $(( ${#WHEELS[@]} + 1 ))" >&2; exit 1; }
rm -rf "$dest/.whl"
mv "$new" "$dest/.whl"

mkdir -p "$dest/.gpu/smollm2"
for f in "${MODEL_FILES[@]}"; do
  if [ -f "$model/$f" ]; then cp "$model/$f" "$dest/.gpu/smollm2/"; fi
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for pattern in /.whl/ /.gpu/; do
  grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >> "$exclude"
done
echo "$dest/.whl: $count wheels ($(du -sh "$dest/.whl" | cut -f1)); $dest/.gpu/smollm2: $(ls "$dest/.gpu/smollm2" | wc -l) files"
