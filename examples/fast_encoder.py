"""Encoder throughput: ``optimize``, then the fused dense parts, then (on CUDA) the encoder as CUDA graphs.

Runs offline on the shipped models::

    python examples/fast_encoder.py                                   # switch-tiny-ddtp on the CPU
    python examples/fast_encoder.py --model nllb --device cuda --dtype bfloat16 --batch 32
    python examples/fast_encoder.py --model google/switch-base-128 --device cuda --dtype bfloat16 --batch 128

For each setting it prints the median encoder time and how far the encoder states are from the
unfused optimized model's (per token, ``|a - b| / |b|``): ``fuse_dense`` agrees to rounding, the graph
replays its eager result exactly. Inputs are sentences repeated to fill ``--batch`` rows.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.timing import median_ms

SHIPPED = {"switch": "switch-tiny-ddtp", "nllb": "nllb-moe-tiny-ddtp"}
SENTENCES = [
    "A small library for reading and writing configuration files.",
    "Fast image viewer with support for many file formats.",
    "The server sends a message to every client when the database changes.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="switch", help="switch, nllb (shipped) or a hub name / path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def encode_ms(model, batch: dict, repeats: int) -> tuple[torch.Tensor, float]:
    """The encoder states and the median time of ``repeats`` forwards (after two warm-up calls)."""
    encoder = model.get_encoder()
    with torch.no_grad():
        ms = median_ms(lambda: encoder(**batch), batch["input_ids"].device, repeats=repeats, warmup=2)
        return encoder(**batch).last_hidden_state.float(), ms


def distance(a: torch.Tensor, b: torch.Tensor) -> str:
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).flatten()
    return f"per-token distance from optimize(): median {rel.median().item():.2g}, max {rel.max().item():.2g}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = str(shipped_model_path(SHIPPED[args.model])) if args.model in SHIPPED else args.model
    tok = AutoTokenizer.from_pretrained(name)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=dtype).to(args.device).eval()
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    batch = dict(tok(texts, return_tensors="pt", padding=True).to(args.device))

    settings = [("optimize()", {}), ("optimize(fuse_dense=True)", {"fuse_dense": True})]
    if torch.device(args.device).type == "cuda" and model.config.model_type in ("switch_transformers", "nllb-moe"):
        settings.append(
            ('optimize(fuse_dense=True, cuda_graphs="encoder")', {"fuse_dense": True, "cuda_graphs": "encoder"})
        )  # noqa: E501
    reference = None
    tokens = batch["input_ids"].numel()
    for label, kwargs in settings:
        try:
            hf_moe_opt.optimize(model, **kwargs)
        except ValueError as err:  # e.g. NLLB-MoE encoder graphs before transformers 5.24
            print(f"{label}: not available here ({err})")
            continue
        states, ms = encode_ms(model, batch, args.repeats)
        hf_moe_opt.restore(model)
        reference = states if reference is None else reference
        rate = tokens / ms * 1e3
        print(f"{label}: {ms:.2f} ms per encoder forward ({rate:.0f} tokens/s); {distance(states, reference)}")


if __name__ == "__main__":
    main()
