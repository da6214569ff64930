"""MoE layer benchmark at real layer shapes: HF eager vs sort + grouped GEMM vs Triton, eager and graphed.

    python benchmarks/bench_layer.py --out benchmarks/results/layer_h200.json

For each shape and token count, in one run on one GPU: HF's eager block (for NLLB-MoE the correct
eager reference in transformers 4.57's loop structure), our layer with the torch backend
(sort + ``torch._grouped_mm``) and with the Triton backend, each eager and CUDA-graph replayed (one
replay per call, host launch included: ``*_graph_ms``; up to 512 tokens also 20 calls in one graph,
per call: ``*_graph20_ms``, the device time a whole-step graph sees); the floor from the bandwidth
and matmul rate measured in the same run; ratios; peak memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..argparsing import OneLineErrorParser
from ..baselines import NllbMoeEagerReference
from ..experts import available_backends
from ..timing import median_ms
from .common import (
    LAYER_SHAPES,
    add_floor_ratios,
    environment,
    floor_ms,
    json_out,
    measure_ceilings,
    plot_by_shape,
    print_ceilings,
    save_result,
)

TOKENS = (1, 8, 64, 512, 4096, 16384)


def build_block(name: str, device: torch.device):
    from transformers import NllbMoeConfig, SwitchTransformersConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    e, d, f, k = LAYER_SHAPES[name]
    with torch.device(device):
        if k == 1:
            cfg = SwitchTransformersConfig(d_model=d, d_ff=f, num_experts=e, expert_capacity=1 << 30)
            block = SwitchTransformersSparseMLP(cfg)
        else:
            cfg = NllbMoeConfig(d_model=d, num_experts=e, moe_token_dropout=0.0)
            block = NllbMoeSparseMLP(cfg, ffn_dim=f)
    return block.to(torch.bfloat16).eval(), cfg


def graphed(fn, example):
    """Capture ``fn(example)`` in a CUDA graph; returns a replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(example)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(example)
    return g.replay


# Calls captured in one graph for the per-call device time of small batches (see graphed_calls_ms).
GRAPH_CALLS = 20
GRAPH_CALLS_MAX_TOKENS = 512


def graphed_calls_ms(fn, example, device, repeats: int, calls: int = GRAPH_CALLS) -> float:
    """Per-call time of ``calls`` calls of ``fn(example)`` captured in one CUDA graph, ms (median over
    ``repeats`` replays). Unlike one replay per call, this leaves out the host's graph launch, as a
    decode step captured whole does (hf_moe_opt.step_graphs): the layer's own device time."""
    replay = graphed(lambda x: [fn(x) for _ in range(calls)], example)
    return median_ms(replay, device, repeats) / calls


def peak_mb(fn, device) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_shape(name, device, ceilings, tokens, repeats):
    from ..patches import NllbMoePatch, SwitchTransformersPatch

    e, d, f, k = LAYER_SHAPES[name]
    block, cfg = build_block(name, device)
    eager = block if k == 1 else NllbMoeEagerReference(block)
    inputs = {n: torch.randn(1, n, d, device=device, dtype=torch.bfloat16) for n in tokens}
    rows = {n: {"shape": name, "tokens": n} for n in tokens}
    with torch.no_grad():
        for n in tokens:
            x = inputs[n]
            logits = x.float().reshape(-1, d) @ block.router.classifier.weight.float().T
            active = int(torch.unique(logits.topk(k, dim=-1).indices).numel())
            rows[n]["active_experts"] = active
            rows[n]["floor_ms"] = floor_ms(active, d, f, n * k, ceilings, bias=k == 2)
            rows[n]["hf_eager_ms"] = median_ms(lambda x=x: eager(x), device, repeats)
            rows[n]["hf_eager_peak_mb"] = peak_mb(lambda x=x: eager(x), device)
        patch = SwitchTransformersPatch() if k == 1 else NllbMoePatch()
        layer = patch.build(block, cfg, capacity="model", backend="torch")
        backends = [b for b in ("torch", "triton") if b in available_backends()]
        for backend in backends:
            layer.backend = backend
            layer._resolved.clear()
            for n in tokens:
                x = inputs[n]
                rows[n][f"{backend}_ms"] = median_ms(lambda x=x: layer(x), device, repeats)
                rows[n][f"{backend}_peak_mb"] = peak_mb(lambda x=x: layer(x), device)
                replay = graphed(layer, x)
                rows[n][f"{backend}_graph_ms"] = median_ms(replay, device, repeats)
                if n <= GRAPH_CALLS_MAX_TOKENS:
                    rows[n][f"{backend}_graph{GRAPH_CALLS}_ms"] = graphed_calls_ms(layer, x, device, repeats)
    for r in rows.values():
        add_floor_ratios(r)
        for backend in ("torch", "triton"):
            if f"{backend}_ms" in r:
                r[f"hf_over_{backend}"] = r["hf_eager_ms"] / r[f"{backend}_ms"]
        if "triton_ms" in r:
            r["torch_over_triton"] = r["torch_ms"] / r["triton_ms"]
            r["torch_graph_over_triton_graph"] = r["torch_graph_ms"] / r["triton_graph_ms"]
    return list(rows.values())


def plot(result: dict, path: Path) -> None:
    series = [
        ("hf_eager_ms", "HF eager"),
        ("torch_ms", "sort+grouped_mm"),
        ("torch_graph_ms", "sort+grouped_mm, graph"),
        ("triton_ms", "triton"),
        ("triton_graph_ms", "triton, graph"),
        ("floor_ms", "floor"),
    ]
    plot_by_shape(result, path, series, "MoE layer time, bf16")


def main(argv=None, prog: str | None = None) -> int:
    p = OneLineErrorParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(LAYER_SHAPES), choices=list(LAYER_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=json_out, default="benchmarks/results/layer.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the layer benchmark needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    print_ceilings(ceilings)
    rows = []
    for name in args.shapes:
        for r in bench_shape(name, device, ceilings, args.tokens, args.repeats):
            rows.append(r)
            cols = [f"{k}={v:.3f}" for k, v in r.items() if k.endswith("_ms")]
            print(f"{name:>17} n={r['tokens']:>5} " + " ".join(cols), flush=True)
        torch.cuda.empty_cache()
    save_result({"environment": environment(), "ceilings": ceilings, "rows": rows}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
