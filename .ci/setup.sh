#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with hf_moe_opt and its test/eval extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch (a CUDA build works too; pip picks what the machine offers).
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[test,eval,triton]"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
