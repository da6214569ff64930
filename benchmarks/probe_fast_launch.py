"""Paired A/B: decode steps with direct kernel launches against Triton's launch path.

    python benchmarks/probe_fast_launch.py --out fast_launch_h200.json

``hf_moe_opt.kernels.launch`` calls a compiled kernel directly once its specialisation has run
(``HF_MOE_OPT_FAST_LAUNCH=0``: every call through ``kernel[grid](...)``). Two measurements, each
with both paths taken in turn so host jitter hits them alike:

* ``calls``: the host time of one router + decode-experts call pair (four launches) at one token on
  the layer shape, and the GPU time of the same pair (CUDA events over a block): the launch-free floor;
* ``stack``: ``bench_cache.py``'s MoE-only stack, resident and expert-cached (``--fraction``), each
  timed in blocks of steps with the direct path on and off in turn; median time per token per
  variant, the direct path over Triton's, and cached over resident within each path. Outputs of the
  two paths must be identical (checked on every timed step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_moe_opt.benchmarking.common import block_ms  # noqa: E402
from hf_moe_opt.kernels import launch as fast  # noqa: E402

PATHS = {"direct": "1", "triton": "0"}


def _set_path(name: str) -> None:
    os.environ[fast.ENV_VAR] = PATHS[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calls(family: str, blocks: int, block: int, device: torch.device, smoke: bool) -> dict:
    """Host and GPU time of router + experts at one token, on one layer's shape."""
    import bench_cache

    from hf_moe_opt.experts.activation import Activation
    from hf_moe_opt.kernels.gemv import gemv_moe_ffn
    from hf_moe_opt.kernels.router import fused_router

    e, d, f, k = bench_cache.SMOKE_SHAPES[family] if smoke else bench_cache.LAYER_SHAPES[_shape(family)]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(e, d, generator=g) / d**0.5).to(device, torch.float32)
    w1 = (torch.randn(e, f, d, generator=g) / d**0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(e, d, f, generator=g) / f**0.5).to(device, torch.bfloat16)
    xs = [torch.randn(1, d, generator=g).to(device, torch.bfloat16) for _ in range(block)]
    act = Activation("relu", torch.relu)
    mode = "switch" if k == 1 else "nllb"

    def one(x):
        _, index, gates = fused_router(x, w, None, mode=mode, logits_dtype=torch.float32, gates_dtype=x.dtype)
        return gemv_moe_ffn(x, index, gates, None, w1, None, w2, None, act)

    host: dict[str, list[float]] = {name: [] for name in PATHS}
    gpu: dict[str, list[float]] = {name: [] for name in PATHS}
    for name in PATHS:  # compile and fill both paths' caches
        _set_path(name)
        for x in xs:
            one(x)
    _sync(device)
    for _ in range(blocks):
        for name in PATHS:
            _set_path(name)
            _sync(device)
            start = end = None
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for x in xs:
                one(x)
            host[name].append((time.perf_counter() - t0) * 1e6 / block)
            if end is not None:
                end.record()
                end.synchronize()
                gpu[name].append(start.elapsed_time(end) * 1e3 / block)
    row = {
        "what": "router + experts, one token, host time per call pair (4 launches)",
        "family": family,
        "shape": [e, d, f, k],
        "host_us": {name: statistics.median(v) for name, v in host.items()},
        "gpu_span_us": {name: statistics.median(v) for name, v in gpu.items()} if gpu["direct"] else None,
    }
    row["host_saved_us_per_launch"] = (row["host_us"]["triton"] - row["host_us"]["direct"]) / 4
    return row


def _shape(family: str) -> str:
    return "switch-base-128" if family == "switch" else "nllb-moe-54b"


@torch.no_grad()
def stack(family: str, layers: int, batch: int, fraction: float, policy: str, warmup: int, steps: int, block: int,
          device: torch.device, smoke: bool) -> dict:  # fmt: skip
    import bench_cache

    import hf_moe_opt

    shape = bench_cache.SMOKE_SHAPES[family] if smoke else None
    # One resident model serves both paths (it keeps no state between steps); each path has its own
    # cached model from the same seed, so each sees its own misses on the same token stream.
    variants = [("resident", "direct"), ("resident", "triton"), ("cached", "direct"), ("cached", "triton")]
    models = {}
    for m, p in variants:
        if m == "resident" and models:
            models[(m, p)] = models[("resident", "direct")]
            continue
        torch.manual_seed(0)
        with torch.device(device):
            model = bench_cache.MoEStack(family, layers, shape).to(torch.bfloat16).eval()
        cache = {} if m == "resident" else {"expert_cache": fraction, "cache_policy": policy}
        bench_cache._optimize(model, capacity="none", **cache)
        models[(m, p)] = model
    stream = bench_cache.token_stream(model.d_model, batch, warmup + steps, device, seed=batch)
    for (_, p), model in models.items():
        _set_path(p)
        for x in stream[:warmup]:
            model(x)
        hf_moe_opt.reset_stats(model)
    times: dict[str, list[float]] = {f"{m}/{p}": [] for m, p in variants}
    mismatches = 0
    timed = stream[warmup:]
    for b, start in enumerate(range(0, len(timed) - block + 1, block)):
        xs = timed[start : start + block]
        outs = {}
        for m, p in variants if b % 2 == 0 else variants[::-1]:  # alternate the order
            _set_path(p)
            ms, outs[(m, p)] = block_ms(models[(m, p)], xs, device)
            times[f"{m}/{p}"].append(ms)
        for m in ("resident", "cached"):
            pairs = zip(outs[(m, "direct")], outs[(m, "triton")], strict=True)
            mismatches += sum(not torch.equal(a, b) for a, b in pairs)
    per_block = {name: statistics.median(t) for name, t in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    row = {
        "family": family,
        "layers": layers,
        "batch": batch,
        "fraction_resident": fraction,
        "policy": policy,
        "blocks": len(times["resident/direct"]),
        "block_steps": block,
        "ms_per_token": per_block,
        "direct_over_triton": {m: ratio(f"{m}/direct", f"{m}/triton") for m in ("resident", "cached")},
        "cached_over_resident": {p: ratio(f"cached/{p}", f"resident/{p}") for p in PATHS},
        "output_mismatches": mismatches,
    }
    for p in PATHS:  # each cached model's own hit rate over the timed steps
        stats = hf_moe_opt.stats(models[("cached", p)]).values()
        used = sum(s["hits"] + s["misses"] for s in stats)
        row.setdefault("hit_rate", {})[p] = sum(s["hits"] for s in stats) / max(used, 1)
    for (m, p), model in models.items():
        if (m, p) != ("resident", "triton"):  # the same model as resident/direct
            hf_moe_opt.restore(model)
    return row


def plot(result: dict, path: Path) -> None:
    """Time per token of each stack row, direct launches beside Triton's path."""
    from hf_moe_opt.benchmarking.common import plot_stack_bars

    rows = result["stack"]
    labels = [f"{r['family']} x{r['layers']} b{r['batch']}\ncached {r['fraction_resident']:.0%}" for r in rows]
    title = f"decode steps, direct launches vs Triton's path, {result['environment']['device']}"
    plot_stack_bars(rows, "ms_per_token", labels, path, ylabel="ms per token", title=title)


def main(argv: list[str] | None = None) -> int:
    from hf_moe_opt.benchmarking.common import add_stack_probe_args, environment, probe_device, save_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_probe_args(p, warmup=100, steps=300)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--call-blocks", type=int, default=40)
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    device = probe_device(args.smoke, "probe_fast_launch.py")
    if device is None:
        return 1

    result: dict = {"environment": environment(), "calls": [], "stack": []}
    before = os.environ.get(fast.ENV_VAR)
    try:
        _measure(args, device, result)
    finally:  # the measurements flip the variable: leave it as found
        if before is None:
            os.environ.pop(fast.ENV_VAR, None)
        else:
            os.environ[fast.ENV_VAR] = before
    if args.out:
        save_result(result, args.out, plot)
    return 0


def _measure(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    for family in args.families:
        row = calls(family, args.call_blocks, args.block, device, args.smoke)
        result["calls"].append(row)
        print(json.dumps(row), flush=True)
    for family in args.families:
        layers = 4 if family == "switch" else 2
        for batch in args.batches:
            row = stack(family, layers, batch, args.fraction, args.policy, args.warmup, args.steps, args.block,
                        device, args.smoke)  # fmt: skip
            result["stack"].append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
