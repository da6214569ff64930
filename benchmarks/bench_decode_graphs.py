"""Whole-step CUDA-graph decoding: time per decode step, HF eager vs optimize() vs per-layer vs step graphs.

    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py --quick       # switch-base-128, ~3 min, one H200
    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py               # + qwen3-30b-a3b and nllb-moe-54b
    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py --cpu-smoke --out /tmp/decode.json   # tiny, CPU

Real configs with random bf16 weights (``hf_moe_opt.benchmarking.model.random_model``). For each batch
size, the time of one decode step (one new token per sequence): the difference of two greedy
generations of 4 and 20 new tokens from 32-token prompts, CUDA events, a warm-up, then the median of
repeats (``hf_moe_opt.benchmarking.model.decode_ms_per_token``). Variants, on the same weights:

* ``hf_eager``: transformers as loaded (NLLB-MoE: the correct eager reference block);
* ``optimize``: ``hf_moe_opt.optimize(model)``;
* ``layer_graphs``: ``optimize(model, cuda_graphs=True)``, each MoE layer's routed part graph-replayed;
* ``step_graphs``: ``optimize(model, cuda_graphs="step")``, whole decode steps graph-replayed.

The floor of a step (``hf_moe_opt.benchmarking.floors.decode_floor``, shared with the model benchmark):
the bytes one decode step reads (the dense weights of the modules it calls, the LM head, per MoE layer
the experts this batch's tokens were routed to, counted in an ``optimize()`` run, and the KV cache)
over the copy bandwidth measured in the same run. The run also records whether ``step_graphs``
generates the tokens ``optimize()`` generates. Writes JSON to ``--out`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hf_moe_opt
from hf_moe_opt.baselines import hf_reference
from hf_moe_opt.benchmarking.common import (
    bench_device,
    each_model,
    environment,
    json_out,
    plot_models_by_batch,
    save_result,
)
from hf_moe_opt.benchmarking.floors import decode_floor
from hf_moe_opt.benchmarking.model import (
    decode_ms_per_token,
    generated,
    random_ids,
    random_model,
    run_step_graphs,
    tiny_config,
)

VARIANTS = ("hf_eager", "optimize", "layer_graphs", "step_graphs")
QUICK_MODELS = ["switch-base-128"]
FULL_MODELS = ["switch-base-128", "qwen3-30b-a3b", "nllb-moe-54b"]


@torch.no_grad()
def run_model(name: str, device: torch.device, batches: list[int], args, ceilings: dict) -> dict:
    config = tiny_config(name) if args.cpu_smoke else None
    model = random_model(name, device, config)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = {b: random_ids(model, b, args.prompt, device, gen) for b in batches}
    times = {v: {} for v in VARIANTS}
    tokens: dict[int, torch.Tensor] = {}
    record = {"model": name, "batches": []}
    timing = dict(short=args.short, long=args.long, prompt=args.prompt, repeats=args.repeats)

    def time_all(variant: str) -> None:
        for b in batches:
            times[variant][b] = decode_ms_per_token(model, b, device, ids=prompts[b], **timing)
            print(f"{name} batch {b}: {variant} {times[variant][b]:.3f} ms/step", flush=True)

    with hf_reference(model):
        time_all("hf_eager")

    hf_moe_opt.optimize(model)
    time_all("optimize")
    floor = {}
    for b in batches:
        tokens[b] = generated(model, prompts[b], args.long)
        floor[b] = decode_floor(model, prompts[b], args.short, args.long, ceilings)
    hf_moe_opt.restore(model)

    hf_moe_opt.optimize(model, cuda_graphs=True)
    time_all("layer_graphs")
    hf_moe_opt.restore(model)

    same_tokens = {}

    def measure_step_graphs() -> None:
        time_all("step_graphs")
        for b in batches:
            same_tokens[b] = bool(torch.equal(generated(model, prompts[b], args.long), tokens[b]))

    step = run_step_graphs(model, device, measure_step_graphs, name)

    for b in batches:
        f = floor[b]
        floor_ms = f["floor_ms"]
        row = {"batch": b, **{f"{v}_ms": times[v].get(b) for v in VARIANTS}}
        row.update(floor_ms=floor_ms, step_weight_gib=f["weight_read_gib"], kv_read_gib=f["kv_read_gib"],
                   read_gib=f["read_gib"], distinct_experts_per_layer=f["distinct_experts_per_layer"])  # fmt: skip
        row["step_tokens_equal_optimize"] = same_tokens.get(b)
        if times["step_graphs"].get(b):
            t = times["step_graphs"][b]
            row.update(step_vs_hf_eager=row["hf_eager_ms"] / t, step_vs_layer_graphs=row["layer_graphs_ms"] / t,
                       step_over_floor=t / floor_ms)  # fmt: skip
        record["batches"].append(row)
        print(f"{name} batch {b}: floor {floor_ms:.3f} ms/step ({f['read_gib']:.2f} GiB read, "
              f"KV cache {f['kv_read_gib']:.2f})", flush=True)  # fmt: skip
    record.update(step)
    return record


def plot(result: dict, path: Path) -> None:
    plot_models_by_batch(result, path, VARIANTS, "ms per decode step", "read floor (weights + KV cache)",
                         "decode step time, bf16, random weights")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help=f"default: {' '.join(FULL_MODELS)} ({QUICK_MODELS[0]} with --quick)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--quick", action="store_true", help="switch-base-128 only, 3 repeats")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (checks the script runs)")
    p.add_argument("--short", type=int, default=4, help="new tokens of the shorter generation")
    p.add_argument("--long", type=int, default=20, help="new tokens of the longer generation")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=json_out, default="benchmarks/results/decode_graphs.json")
    args = p.parse_args(argv)
    found = bench_device(args.cpu_smoke)
    if found is None:
        return 2
    device, ceilings = found
    if args.cpu_smoke:
        models = args.models or ["switch-tiny", "qwen3-tiny"]
        batches = args.batches if argv and "--batches" in argv else [1, 4]
        args.short, args.long, args.prompt, args.repeats = 2, 5, 8, 1
    else:
        models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
        batches = args.batches
    records = each_model(models, lambda name: run_model(name, device, batches, args, ceilings), device)
    save_result({"environment": environment(), "ceilings": ceilings, "models": records}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
