"""Whole ``generate`` calls of sequence-to-sequence MoE models: HF eager vs the optimized variants.

    PYTHONPATH=$PWD python benchmarks/bench_generate.py                      # switch-base-128, one H200
    PYTHONPATH=$PWD python benchmarks/bench_generate.py --models switch-base-128 nllb-moe-54b
    PYTHONPATH=$PWD python benchmarks/bench_generate.py --cpu-smoke --out /tmp/generate.json

What a translation or summarisation request costs end to end: one greedy ``generate`` of ``--new``
tokens from a ``batch x --prompt`` random prompt (the encoder pass, then one decode step per token;
``--num-beams``: beam search instead),
real configs with random bf16 weights, CUDA events, warm-up calls (they capture the graphs), median
of repeats, all variants on the same weights in one run:

* ``hf_eager``: transformers as loaded (NLLB-MoE: the correct eager reference block);
* ``optimize``: ``hf_moe_opt.optimize(model)``;
* ``step``: ``optimize(model, fuse_dense=True, cuda_graphs="step")``: decode steps graph-replayed;
* ``encoder_step``: ``optimize(model, fuse_dense=True, cuda_graphs=("encoder", "step"))``: the
  encoder pass replayed too.

The floor of a call: the encoder's floor (``encoder_floor``: weights and routed experts read, matmul
FLOPs; the larger of the two times) plus ``--new`` times the mean floor of a decode step
(``decode_floor``: weights, routed experts and KV cache read), with the copy bandwidth and matmul
rate measured in the same run. Each graphed variant records whether it generated the tokens of
``fuse_dense`` without graphs (``tokens_equal_fused``) and of ``optimize`` (``tokens_equal_optimize``;
``fuse_dense`` rounds differently, so near-tied logits of random weights may pick another token).
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
from hf_moe_opt.benchmarking.floors import decode_floor, encoder_floor
from hf_moe_opt.benchmarking.model import random_ids, random_model, tiny_config
from hf_moe_opt.step_graphs import EagerCapture
from hf_moe_opt.timing import median_ms

VARIANTS = ("hf_eager", "optimize", "step", "encoder_step")
GRAPH_MODES = {"step": "step", "encoder_step": ("encoder", "step")}


def _use_eager_stand_in(model) -> None:
    """Off CUDA: the graph runners' eager stand-in (same static-buffer paths, run eagerly)."""
    from hf_moe_opt import encoder_graphs, step_graphs

    for runner in (step_graphs.runner_of(model), encoder_graphs.runner_of(model)):
        if runner is not None:
            runner.capture = EagerCapture(check_host_reads=False)


def generated(model, ids: torch.Tensor, new_tokens: int, beams: int = 1) -> torch.Tensor:
    """``generate`` of exactly ``new_tokens`` new tokens: greedy, or beam search over ``beams`` beams."""
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=beams)


@torch.no_grad()
def run_model(name: str, device: torch.device, batches: list[int], args, ceilings: dict) -> dict:
    config = tiny_config(name) if args.cpu_smoke else None
    model = random_model(name, device, config)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = {b: random_ids(model, b, args.prompt, device, gen) for b in batches}
    times: dict[str, dict[int, float]] = {v: {} for v in VARIANTS}
    tokens: dict[str, dict[int, torch.Tensor]] = {v: {} for v in ("optimize", "fused", *GRAPH_MODES)}
    errors: dict[str, str] = {}

    def time_all(variant: str) -> None:
        for b in batches:
            call = lambda b=b: generated(model, prompts[b], args.new, args.num_beams)  # noqa: E731
            times[variant][b] = median_ms(call, device, repeats=args.repeats, warmup=2)
            print(f"{name} batch {b}: {variant} {times[variant][b]:.2f} ms per generate", flush=True)

    with hf_reference(model):
        time_all("hf_eager")

    hf_moe_opt.optimize(model)
    time_all("optimize")
    floors = {}
    for b in batches:
        tokens["optimize"][b] = generated(model, prompts[b], args.new, args.num_beams)
        enc = encoder_floor(model, prompts[b], ceilings)
        # Beam search decodes batch x beams sequences per step, traced as a real beam search.
        step = decode_floor(model, prompts[b], 1, args.new, ceilings, num_beams=args.num_beams)
        floors[b] = {"encoder_floor_ms": enc["floor_ms"], "step_floor_ms": step["floor_ms"],
                     "floor_ms": enc["floor_ms"] + args.new * step["floor_ms"]}  # fmt: skip
    hf_moe_opt.restore(model)

    hf_moe_opt.optimize(model, fuse_dense=True)
    for b in batches:
        tokens["fused"][b] = generated(model, prompts[b], args.new, args.num_beams)
    hf_moe_opt.restore(model)

    for variant, modes in GRAPH_MODES.items():
        try:
            hf_moe_opt.optimize(model, fuse_dense=True, cuda_graphs=modes)
        except ValueError as err:  # e.g. NLLB-MoE's graphs on transformers < 5.24
            errors[variant] = str(err)
            print(f"{name}: {variant} not measured: {err}", flush=True)
            continue
        if device.type != "cuda":
            _use_eager_stand_in(model)
        try:
            time_all(variant)
            for b in batches:
                tokens[variant][b] = generated(model, prompts[b], args.new, args.num_beams)
        finally:
            hf_moe_opt.restore(model)

    record = {"model": name, "prompt": args.prompt, "new_tokens": args.new, "num_beams": args.num_beams,
              "not_measured": errors, "batches": []}  # fmt: skip
    for b in batches:
        row = {"batch": b, **{f"{v}_ms": times[v].get(b) for v in VARIANTS}, **floors[b]}
        for v in GRAPH_MODES:
            if b in tokens[v]:
                row[f"{v}_tokens_equal_fused"] = bool(torch.equal(tokens[v][b], tokens["fused"][b]))
                row[f"{v}_tokens_equal_optimize"] = bool(torch.equal(tokens[v][b], tokens["optimize"][b]))
        for v in VARIANTS[1:]:
            if row[f"{v}_ms"]:
                row[f"{v}_vs_hf_eager"] = row["hf_eager_ms"] / row[f"{v}_ms"]
                row[f"{v}_over_floor"] = row[f"{v}_ms"] / row["floor_ms"]
        if row["encoder_step_ms"] and row["step_ms"]:
            row["encoder_graph_gain"] = row["step_ms"] / row["encoder_step_ms"]
        record["batches"].append(row)
        print(f"{name} batch {b}: floor {row['floor_ms']:.2f} ms (encoder {row['encoder_floor_ms']:.2f} + "
              f"{args.new} x step {row['step_floor_ms']:.3f})", flush=True)  # fmt: skip
    return record


def plot(result: dict, path: Path) -> None:
    def title(rec: dict) -> str:
        beams = f", {rec['num_beams']} beams" if rec.get("num_beams", 1) > 1 else ""
        return f"{rec['model']}: {rec['prompt']} prompt, {rec['new_tokens']} new tokens{beams}"

    plot_models_by_batch(result, path, VARIANTS, "ms per generate call", "floor",
                         "generate, bf16, random weights", title)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="default: switch-base-128")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--prompt", type=int, default=128, help="prompt (encoder) tokens per sequence")
    p.add_argument("--new", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny config on the CPU (checks the script runs)")
    p.add_argument("--out", type=json_out, default="benchmarks/results/generate.json")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be at least 2 (the floor averages the decode steps after the first)")
    found = bench_device(args.cpu_smoke)
    if found is None:
        return 2
    device, ceilings = found
    models = args.models or (["switch-tiny"] if args.cpu_smoke else ["switch-base-128"])
    batches = args.batches
    if args.cpu_smoke:
        batches = args.batches if argv and "--batches" in argv else [1, 3]
        args.prompt, args.new, args.repeats = 8, 4, 1
    records = each_model(models, lambda name: run_model(name, device, batches, args, ceilings), device)
    save_result({"environment": environment(), "ceilings": ceilings, "models": records}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
