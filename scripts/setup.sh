#!/usr/bin/env bash
# Set up palsgd_hf on a fresh machine: a venv in .venv with the package, every extra (demo, bench, DeepSpeed, trl, PEFT) and the test tools.
# torch is pinned to the CPU build these machines carry on disk (any other version pulls a multi-GB
# CUDA build); on a GPU machine install your own torch first and drop the pin with TORCH_SPEC=torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC" -e ".[demo,bench,deepspeed,trl,peft,ft,dev]"
echo "palsgd_hf installed in $(pwd)/.venv"
