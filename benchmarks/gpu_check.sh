#!/usr/bin/env bash
# The GPU path in one run: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] (benchmarks/gpu_check.py says
# what it checks). On a lent GPU machine, whose Python has torch but not DeepSpeed or papermill, carry the
# wheels that `make gpu-wheels` downloads into .whl/: they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ! "$PYTHON" -c "import deepspeed, papermill, plotly" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# npp from this checkout, installed or not (the deepspeed launcher runs npp/train.py as a script).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
