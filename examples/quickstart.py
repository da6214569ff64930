"""Quickstart: load a MoE model, optimize it, generate, restore. Runs offline on the shipped model.

python examples/quickstart.py                 # shipped switch-tiny-ddtp on CPU
python examples/quickstart.py --model google/switch-base-8 --device cuda --dtype bfloat16
"""

import argparse
import time

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(shipped_model_path("switch-tiny-ddtp")))
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
args = parser.parse_args()

tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
texts = [
    "This package provides a small <extra_id_0> for reading configuration files.",
    "A fast and <extra_id_0> web server with a plugin system.",
]
batch = tok(texts, return_tensors="pt", padding=True).to(args.device)


def run(m):
    """The tokens, and the time of a second, warm call (the first one pays one-off setup)."""
    with torch.no_grad():
        m.generate(**batch, max_new_tokens=12, do_sample=False)
        t0 = time.perf_counter()
        out = m.generate(**batch, max_new_tokens=12, do_sample=False)
    return out, time.perf_counter() - t0


before, t_before = run(model)
hf_moe_opt.optimize(model)  # every sparse MoE block -> one dynamic-gating layer, in place
after, t_after = run(model)
print(model.encoder.block[1].layer[1].mlp if hasattr(model, "encoder") else model)
for text, ids in zip(texts, tok.batch_decode(after, skip_special_tokens=False), strict=True):
    print(f"{text!r} -> {ids!r}")
print(f"identical tokens: {torch.equal(before, after)}; warm generate {t_before:.3f}s before, {t_after:.3f}s after")
hf_moe_opt.restore(model)  # the original modules back, same weights
print("restored:", not hf_moe_opt.is_optimized(model))
