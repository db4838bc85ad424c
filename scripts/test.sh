#!/usr/bin/env bash
# Set up (first run only) and run the test suite: unit tests plus in-process materialisation of
# every asset, the Dagster UI in headless Chromium (tests/test_ui.py: slow, browser) and the deployment on
# a real Postgres. The rest of the slow end-to-end tier (`-m slow`) runs with: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# what the machine has to offer this run (memory and shared memory decide whether DeepSpeed fits)
echo "machine: $(nproc) cores; $(free -m | awk '/^Mem:/ {print $7 " MiB available of " $2}');" \
     "/dev/shm $(df -m /dev/shm 2>/dev/null | awk 'NR==2 {print $3 " MiB used"}'); disk $(df -m . | awk 'NR==2 {print $4 " MiB free"}')"
# a test that hangs fails after 20 minutes instead of holding the whole run
.venv/bin/python -m pytest -q -m "not slow or browser" --timeout 1200 --durations 12 "$@"
