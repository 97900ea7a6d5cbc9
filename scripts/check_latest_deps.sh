#!/usr/bin/env bash
# Scheduled-style check, not the CI gate: the test suite on the newest releases of every dependency.
#   bash scripts/check_latest_deps.sh            # throwaway venv, newest versions, ruff + the suite
#   bash scripts/check_latest_deps.sh --write    # ... and, if it passed, refresh constraints.txt from it
# CI installs from constraints.txt (the versions the suite last passed with), so a new release can only
# break this check, never CI; when it fails, fix the code (or pin an upper bound in pyproject.toml) before
# refreshing the lock. torch stays at the CPU build CI uses; everything else floats to its newest release.
set -euo pipefail
cd "$(dirname "$0")/.."

write=0
case "${1:-}" in
    --write) write=1 ;;
    "") ;;
    *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

venv=$(mktemp -d "${TMPDIR:-/tmp}/centernet-edge-latest.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
python -m pip list 2>/dev/null | grep -Ei '^(torch|onnx|onnxruntime|onnxscript|numpy|opencv-python-headless|pycocotools) ' || true

ruff check .
set +e
python -m pytest -q -p no:cacheprovider
status=$?
set -e
if [ "$status" -ne 0 ]; then
    echo "the suite fails on the newest dependency versions (exit $status); constraints.txt left as it is" >&2
    exit "$status"
fi
if [ "$write" -eq 1 ]; then
    {
        grep '^#' constraints.txt
        python -m pip freeze --all --exclude-editable | grep -v -E '^(pip|centernet-edge)==|^#' \
            | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt refreshed from the passing environment; review the diff and commit it"
fi
