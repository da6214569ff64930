"""Continuous batching (transformers' ``generate_batch``) with optimized MoE layers.

Runs offline on the shipped Qwen3-MoE causal LM::

    python examples/continuous_batching.py                       # qwen3-moe-tiny-ddtp, CPU, seconds
    python examples/continuous_batching.py --device cuda --dtype bfloat16 --expert-cache 0.5

Continuous batching schedules requests of different lengths together: every step packs prefill
chunks and decode tokens of several requests into one flat batch ``[1, T, D]`` with paged attention,
and a finished request frees its place for the next one. The optimized layers route each token on
its own, so ``hf_moe_opt.optimize(model)`` (or ``experts_implementation="hf_moe_opt"``) gives the
tokens of the un-optimized model under ``generate_batch`` as under ``generate``.
``hf_moe_opt.integrations.continuous_batching_config`` builds the ``ContinuousBatchingConfig``
with the same option names on every transformers version, and turns transformers' CUDA graphs off
for layers that cannot be captured (``expert_cache=``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.integrations import continuous_batching_available, continuous_batching_config

PROMPTS = [
    "This package provides",
    "A library for reading and writing configuration files in several formats, with",
    "Fast image viewer",
    "This package contains the documentation for the command line tools that manage",
    "Python bindings for",
    "Utilities to inspect and repair file systems on removable",
]

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(shipped_model_path("qwen3-moe-tiny-ddtp")))
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--max-new-tokens", type=int, default=24)
parser.add_argument("--expert-cache", type=float, default=None, help="fraction of experts resident (buffering)")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()

if not continuous_batching_available():
    import transformers

    sys.exit(f"transformers {transformers.__version__} has no continuous batching (generate_batch); upgrade it")
if args.threads:
    torch.set_num_threads(args.threads)

tok = AutoTokenizer.from_pretrained(args.model)
dtype = getattr(torch, args.dtype)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
prompts = [tok(text)["input_ids"] for text in PROMPTS]  # token lists of different lengths, no padding
generation = GenerationConfig(
    max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
)
# On a CPU transformers sizes the paged cache from host memory, which is slow to allocate: keep it small.
sizes = dict(page_size=16, num_blocks=64, max_batch_tokens=64) if args.device == "cpu" else {}


def run(m: torch.nn.Module) -> tuple[list[list[int]], float]:
    config = continuous_batching_config(m, **sizes)
    t0 = time.perf_counter()
    results = m.generate_batch(prompts, generation_config=generation, continuous_batching_config=config)
    elapsed = time.perf_counter() - t0
    failed = [r.error for r in results.values() if r.error is not None]
    if failed or len(results) != len(prompts):
        sys.exit(f"continuous batching failed: {failed[:1] or 'missing requests'}")
    return [list(r.generated_tokens) for r in results.values()], elapsed


before, t_before = run(model)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # expert_cache on a CPU: no pinned memory
    hf_moe_opt.optimize(model, expert_cache=args.expert_cache)
after, t_after = run(model)
for text, ids in zip(PROMPTS, after, strict=True):
    print(f"{text!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
print(f"identical tokens: {before == after}; generate_batch {t_before:.3f}s before, {t_after:.3f}s after optimize")
if args.expert_cache is not None:
    hits = sum(s["hits"] for s in hf_moe_opt.stats(model).values())
    misses = sum(s["misses"] for s in hf_moe_opt.stats(model).values())
    print(f"expert cache hit rate {hits / max(1, hits + misses):.2f}")

# Per request with plain generate (no padding needed one at a time): the same tokens.
with torch.no_grad():
    single = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids], device=args.device), generation_config=generation)
        single.append(out[0, len(ids) :].tolist())
print(f"same as per-request generate: {single == after}")

hf_moe_opt.restore(model)
# The other integration: transformers' experts interface running hf_moe_opt's dispatch and experts.
hf_moe_opt.register_experts_implementation()
ours = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, experts_implementation="hf_moe_opt")
tokens, t_ours = run(ours.to(args.device).eval())
print(f'experts_implementation="hf_moe_opt": identical tokens: {tokens == before}; generate_batch {t_ours:.3f}s')
