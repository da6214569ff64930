"""Paired A/B: cached one-token decode steps that copy missing experts against steps that read them.

    python benchmarks/probe_host_reads.py --fractions 0.5 0.25 --out benchmarks/results/host_reads_h200.json

``bench_cache.py``'s MoE-only stacks at one token per step, in three builds from the same weights:
resident, expert-cached with ``cache_misses="copy"`` (read the router's choices on the host, copy,
wait) and with ``cache_misses="read"`` (the decode kernels read missing experts from pinned host
memory, the policy runs one step behind; ``hf_moe_opt.cache.host_reads``). Each build is timed in
blocks of steps, the three in turn (order alternating), over the same token stream: median time per
token, each over resident, hit rates, the share of assignments read over the host link, and the
link's floor beside them: the bytes each mode moved over it per token at the pinned rate measured
in the same run. Outputs are compared with the resident build's on every timed step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_moe_opt.benchmarking.common import block_ms  # noqa: E402

MODES = ("resident", "copy", "read")


@torch.no_grad()
def run(family: str, layers: int, fraction: float, policy: str, warmup: int, steps: int, block: int,
        device: torch.device, smoke: bool, pinned_bytes_per_s: float | None) -> dict:  # fmt: skip
    import bench_cache

    import hf_moe_opt

    shape = bench_cache.SMOKE_SHAPES[family] if smoke else None
    backend = "triton" if smoke else "auto"  # the CPU smoke run needs TRITON_INTERPRET=1
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        with torch.device(device):
            model = bench_cache.MoEStack(family, layers, shape).to(torch.bfloat16).eval()
        cache = {} if mode == "resident" else {"expert_cache": fraction, "cache_policy": policy, "cache_misses": mode}
        bench_cache._optimize(model, capacity="none", backend=backend, **cache)
        models[mode] = model
    stream = bench_cache.token_stream(models["resident"].d_model, 1, warmup + steps, device, seed=1)
    for model in models.values():
        for x in stream[:warmup]:
            model(x)
        hf_moe_opt.reset_stats(model)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    worst = {m: 0.0 for m in MODES[1:]}
    timed = stream[warmup:]
    blocks = 0
    for b, start in enumerate(range(0, len(timed) - block + 1, block)):
        xs = timed[start : start + block]
        outs = {}
        for mode in MODES if b % 2 == 0 else MODES[::-1]:
            ms, outs[mode] = block_ms(models[mode], xs, device)
            times[mode].append(ms)
        for mode in MODES[1:]:
            for want, got in zip(outs["resident"], outs[mode], strict=True):
                worst[mode] = max(worst[mode], (want.float() - got.float()).abs().max().item())
        blocks += 1
    per = {m: statistics.median(t) for m, t in times.items()}
    row = {
        "family": family,
        "layers": layers,
        "batch": 1,
        "fraction_resident": fraction,
        "policy": policy,
        "blocks": blocks,
        "block_steps": block,
        "ms_per_token": per,
        "x_resident": {m: per[m] / per["resident"] for m in MODES[1:]},
        "max_abs_diff_vs_resident": worst,
    }
    tokens = blocks * block
    for mode in MODES[1:]:
        stats = list(hf_moe_opt.stats(models[mode]).values())
        hits, misses = sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)
        link = sum(s["bytes_copied"] + s["host_read_bytes"] for s in stats) / tokens
        row.setdefault("hit_rate", {})[mode] = hits / max(hits + misses, 1)
        row.setdefault("host_reads_per_token", {})[mode] = sum(s["host_reads"] for s in stats) / tokens
        row.setdefault("link_bytes_per_token", {})[mode] = link
        if pinned_bytes_per_s:  # the host link's floor: those bytes at the measured pinned rate
            row.setdefault("link_floor_ms_per_token", {})[mode] = 1e3 * link / pinned_bytes_per_s
    for model in models.values():
        hf_moe_opt.restore(model)
    return row


def plot(result: dict, path: Path) -> None:
    """Cached time over resident per mode, one group of bars per row."""
    from hf_moe_opt.benchmarking.common import plot_stack_bars

    rows = result["rows"]
    labels = [f"{r['family']} x{r['layers']}\n{r['fraction_resident']:.0%} resident" for r in rows]
    title = f"one-token steps, misses copied vs read from host memory, {result['environment']['device']}"
    plot_stack_bars(rows, "x_resident", labels, path, ylabel="x resident time per token", title=title, target=1.5)


def main(argv: list[str] | None = None) -> int:
    from hf_moe_opt.benchmarking.common import add_stack_probe_args, environment, probe_device, save_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_probe_args(p, warmup=100, steps=300, batches=False)  # one token per step
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25])
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    device = probe_device(args.smoke, "probe_host_reads.py")
    if device is None:
        return 1
    import bench_cache

    pinned = bench_cache.pinned_bandwidth(device).get("pinned_h2d_bytes_per_s")
    result: dict = {"environment": environment(), "pinned_h2d_bytes_per_s": pinned, "rows": []}
    if pinned:
        print(f"pinned host-to-device: {pinned / 1e9:.1f} GB/s", flush=True)
    for family in args.families:
        layers = 4 if family == "switch" else 2
        for fraction in args.fractions:
            row = run(family, layers, fraction, args.policy, args.warmup, args.steps, args.block, device,
                      args.smoke, pinned)  # fmt: skip
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        save_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
