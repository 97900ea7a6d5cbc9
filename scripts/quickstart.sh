#!/usr/bin/env bash
# Set up a virtual environment and run the main job: checkpoint -> verified end-to-end ONNX.
#   bash scripts/quickstart.sh [CHECKPOINT.pth] [extra centernet-export flags...]
# Without a checkpoint it generates a random-weight official resdcn_18 (real layout, meaningless accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The pinned CPU build first: a loose torch requirement would pull several GB of CUDA wheels.
python -m pip install --quiet torch==2.13.0
# The dependency versions the test suite passed with (constraints.txt), as CI installs them.
python -m pip install --quiet -c constraints.txt -e ".[dev]"

mkdir -p artifacts
checkpoint=${1:-}
[ $# -gt 0 ] && shift
if [ -z "$checkpoint" ]; then
    checkpoint=artifacts/demo_resdcn18.pth
    python scripts/make_demo_checkpoint.py resdcn_18 "$checkpoint"
fi
name=$(basename "${checkpoint%.*}")
centernet-export "$checkpoint" -o "artifacts/$name.onnx" "$@"
echo "exported artifacts/$name.onnx"
