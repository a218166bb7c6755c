#!/bin/sh
# One command that proves the CUDA path (bench/gpu.py says what it runs): `bench/gpu.sh` on a CUDA machine,
# `bench/gpu.sh --dry-run` on a CPU. Python: $PYTHON if set, else the project's .venv when there is one, else
# the machine's python3 (a GPU machine's, with its CUDA build of torch).
cd "$(dirname "$0")/.." || exit 1
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu.py "$@"
