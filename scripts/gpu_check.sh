#!/usr/bin/env bash
# One-shot device check (scripts/gpu_check.py) on a GPU machine without network: installs the carried
# wheels (.whl/, made by scripts/gpu_wheels.sh) into /tmp/site, then runs the check on .gpu/smollm2/;
# the report goes to $OUT/gpu_check.json and the whole log to $OUT/gpu_check.log.
#   bash scripts/gpu_check.sh [scripts/gpu_check.py options]
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT
{
  t0=$(date +%s)
  echo "== install $(ls .whl | wc -l) wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  echo "== installed in $(( $(date +%s) - t0 ))s; launcher: $(head -1 /tmp/site/bin/deepspeed 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  # below the device's 600 s limit per command, so the check's own SIGTERM handler still writes the report
  timeout -k 10 "${GPU_CHECK_TIMEOUT:-530}" python3 scripts/gpu_check.py --out "$OUT" "$@"
  rc=$?
  echo "== gpu_check exit code $rc after $(( $(date +%s) - t0 ))s"
  exit $rc
} 2>&1 | tee "$OUT/gpu_check.log"
