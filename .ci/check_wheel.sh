#!/usr/bin/env bash
# Build the wheel and install it in a fresh virtual environment: proves `pip install` works and that
# the shipped models and config files are packaged.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel . --no-deps -q -w "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==2.13.0" || "$work/venv/bin/python" -m pip install -q torch
"$work/venv/bin/python" -m pip install -q "$work"/dist/*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moe_opt
from hf_moe_opt.assets import SHIPPED_MODELS, shipped_model_path
from pathlib import Path

assert "site-packages" in hf_moe_opt.__file__, hf_moe_opt.__file__
assert (Path(hf_moe_opt.__file__).parent / "kernels" / "configs" / "default.json").is_file()
import hf_moe_opt.patches  # the top-level patches/ folder, installed as a subpackage
for name in SHIPPED_MODELS:
    path = shipped_model_path(name)
    seq2seq = AutoConfig.from_pretrained(path).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(path).eval()
    hf_moe_opt.optimize(model)
    print("wheel ok:", name, "->", len(hf_moe_opt.optimized_layers(model)), "optimized layers")
PY
"$work/venv/bin/hf-moe-opt" --help >/dev/null
echo "wheel install check passed"
