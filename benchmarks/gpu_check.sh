#!/usr/bin/env bash
# The prepared accelerator check ([fast-sampling]): one command, one table, well under 8 minutes on one H100.
#   bash benchmarks/gpu_check.sh                      # the paper's small cascade on cuda
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # the smoke run the test suite makes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
HF_HUB_OFFLINE=1 exec "$PY" benchmarks/gpu_check.py "$@"
