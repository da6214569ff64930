"""Hit rate vs cache size for every eviction policy beside Belady's optimum (CPU; no GPU needed).

    python benchmarks/cache_hit_rates.py --out benchmarks/results/hit_rates.json

Traces: per-decode-step routing of the shipped trained models' decoder MoE layers (greedy decoding
of requests written for this benchmark, batch 1; the causal model's prompt prefill is not part of
its trace), and synthetic skewed traces with temporal locality.
Writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
)

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.benchmarking.common import environment, json_out
from hf_moe_opt.cache import POLICY_NAMES, hit_rate_curve, synthetic_trace, trace_from_counts

REQUESTS = [
    "A small library for reading and writing configuration files.",
    "Fast image viewer with support for many file formats.",
    "Tools to manage the network interfaces of a laptop.",
    "This package contains the documentation for the command line tool.",
    "The server sends a message to every client when the database changes.",
    "A backup program that stores encrypted copies on a remote machine.",
    "Utilities to convert sound files between common formats.",
    "A game in which the player builds railways across a map.",
]


def _decode_steps(model, tok, prompts, new_tokens):
    """One model input per greedy decode step (batch 1), replaying what generate ran. A causal LM's
    cache is filled by its prompt's prefill here, so that only the one-token steps are recorded."""
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    causal = not model.config.is_encoder_decoder
    steps = []
    with torch.no_grad():
        for text in prompts:
            enc = tok([text], return_tensors="pt")
            seq = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if causal:
                cache, start, key, fixed = DynamicCache(), enc["input_ids"].shape[1], "input_ids", {}
                model(input_ids=seq[:, :start], use_cache=True, **{cache_name: cache})
                positions = range(start, seq.shape[1])
            else:
                cache, key = EncoderDecoderCache(DynamicCache(), DynamicCache()), "decoder_input_ids"
                fixed = {"encoder_outputs": model.get_encoder()(**enc), "attention_mask": enc["attention_mask"]}
                positions = range(seq.shape[1] - 1)
            for t in positions:
                steps.append({**fixed, key: seq[:, t : t + 1], cache_name: cache, "use_cache": True})
    return steps


def model_traces(new_tokens: int) -> dict:
    traces = {}
    for name in ("switch-tiny-ddtp", "nllb-moe-tiny-ddtp", "qwen3-moe-tiny-ddtp"):
        path = shipped_model_path(name)
        tok = AutoTokenizer.from_pretrained(path)
        auto = AutoModelForCausalLM if name.startswith("qwen3") else AutoModelForSeq2SeqLM
        model = hf_moe_opt.optimize(auto.from_pretrained(path).eval())
        prompts = REQUESTS
        if name.startswith("switch"):  # a span-corruption LM: mask one word of each request
            prompts = [" ".join(t.split()[:3] + ["<extra_id_0>"] + t.split()[4:]) for t in REQUESTS]
        steps = _decode_steps(model, tok, prompts, new_tokens)
        recorded = hf_moe_opt.profile(model, steps, progress=False, move_to_device=False)
        # The decoder's MoE layers; every layer of the causal LM is one, so its last one only.
        layers = [layer for layer in recorded.layers if "decoder" in layer] or recorded.layers[-1:]
        for layer in layers:
            traces[f"{name} {layer} (decode, batch 1)"] = trace_from_counts(recorded.counts(layer))
        hf_moe_opt.restore(model)
    return traces


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=json_out, default="benchmarks/results/hit_rates.json")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    traces = model_traces(args.new_tokens)
    traces["synthetic: 64 experts, top-2, 8 tokens/step, zipf 1.0, stickiness 0.5"] = synthetic_trace(
        64, 2, 8, 2000, zipf_s=1.0, stickiness=0.5, seed=0
    )
    traces["synthetic: same, popularity reshuffled every 200 steps"] = synthetic_trace(
        64, 2, 8, 2000, zipf_s=1.0, stickiness=0.5, reshuffle_every=200, seed=0
    )
    results = []
    for title, trace in traces.items():
        e = trace.num_experts
        slots = sorted({max(1, round(f * e)) for f in (0.125, 0.25, 0.375, 0.5, 0.75)})
        curve = hit_rate_curve(trace, POLICY_NAMES, slots)
        quarter = slots.index(max(1, round(0.25 * e)))
        gap = {pol: curve["belady"][quarter] - curve[pol][quarter] for pol in POLICY_NAMES}
        results.append({"trace": title, "num_experts": e, "steps": len(trace), "slots": slots, "hit_rate": curve,
                        "belady_minus_policy_at_25pct": gap})  # fmt: skip
        print(f"{title}: 25% resident, Belady {curve['belady'][quarter]:.3f}; "
              + ", ".join(f"{pol} {curve[pol][quarter]:.3f}" for pol in POLICY_NAMES))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "environment": environment(), "results": results},
                              indent=2))  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=True, squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for pol, rates in res["hit_rate"].items():
            style = dict(color="black", linestyle="--", linewidth=2) if pol == "belady" else {}
            ax.plot(res["slots"], rates, marker=".", label=pol, **style)
        ax.set_title(res["trace"], fontsize=7)
        ax.set_xlabel("GPU slots per layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
