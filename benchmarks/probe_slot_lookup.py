"""Paired A/B: a cached decode step whose kernels look the slots up, against one that indexes first.

    python benchmarks/probe_slot_lookup.py --out slot_lookup_h200.json

A cached layer call at one token routes expert ids; the experts sit in slots. The decode kernels can
read each expert's slot from the cache's device slot table themselves (``slot_map``, no launch), or
the cache can index the table first (``table[ids]``: one more launch and its host time, as before).
This builds ``bench_cache.py``'s MoE-only stack three times from one seed (fully resident; cached
with the lookup in the kernels; cached indexing first), warms each on the same token stream, then
times blocks of steps through the three in turn so host jitter hits them alike, and reports the
median per-block time per token of each and the cached ones over the resident. The two cached
variants must give identical outputs (checked on every timed step).
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


def _index_first(store) -> None:
    """Make ``store`` index its slot table with a launch before the kernels (the previous way)."""
    inner = store._experts

    def experts(x, slots, gates, keep, direct, ffn_for, weights, activation, out_scale, slot_map=None):
        if slot_map is not None:
            slots = slot_map[slots]
        return inner(x, slots, gates, keep, direct, ffn_for, weights, activation, out_scale)

    store._experts = experts


@torch.no_grad()
def run(family: str, layers: int, batch: int, fraction: float, policy: str, warmup: int, steps: int, block: int,
        device: torch.device, smoke: bool) -> dict:  # fmt: skip
    import bench_cache

    import hf_moe_opt

    shape = bench_cache.SMOKE_SHAPES[family] if smoke else None
    models = {}
    for name in ("resident", "kernel_lookup", "index_first"):
        torch.manual_seed(0)  # the same weights for all three
        with torch.device(device):
            models[name] = bench_cache.MoEStack(family, layers, shape).to(torch.bfloat16).eval()
        # At fraction 1.0 the cached models hold every expert in a slot: every step is all hits.
        cache = {} if name == "resident" else {"expert_cache": fraction, "cache_policy": policy}
        bench_cache._optimize(models[name], capacity="none", **cache)
    for _, layer in hf_moe_opt.optimized_layers(models["index_first"]):
        _index_first(layer.store)
    d_model = models["resident"].d_model
    stream = bench_cache.token_stream(d_model, batch, warmup + steps, device, seed=batch)
    for model in models.values():
        for x in stream[:warmup]:
            model(x)
        hf_moe_opt.reset_stats(model)  # kernels compiled, slots filled: count the timed steps only
    times: dict[str, list[float]] = {name: [] for name in models}
    ratio: dict[str, list[float]] = {"kernel_lookup": [], "index_first": []}
    mismatches = 0
    timed = stream[warmup:]
    for start in range(0, len(timed) - block + 1, block):
        xs = timed[start : start + block]
        outs = {}
        for name, model in models.items():
            ms, outs[name] = block_ms(model, xs, device)
            times[name].append(ms)
        mismatches += sum(
            not torch.equal(a, b) for a, b in zip(outs["kernel_lookup"], outs["index_first"], strict=True)
        )
        for name in ratio:
            ratio[name].append(times[name][-1] / times["resident"][-1])
    stats = {name: hf_moe_opt.stats(models[name]) for name in ratio}
    row = {
        "family": family,
        "layers": layers,
        "batch": batch,
        "fraction_resident": fraction,
        "policy": policy,
        "blocks": len(times["resident"]),
        "block_steps": block,
        "ms_per_token": {name: statistics.median(t) for name, t in times.items()},
        "x_resident_block_median": {name: statistics.median(r) for name, r in ratio.items()},
        "hit_rate": {
            name: sum(s["hits"] for s in st.values()) / max(sum(s["hits"] + s["misses"] for s in st.values()), 1)
            for name, st in stats.items()
        },
        "host_time_ms_per_step": {
            name: sum(s["host_time_ms"] for s in st.values()) / steps for name, st in stats.items()
        },
        "output_mismatches": mismatches,
    }
    for m in models.values():
        hf_moe_opt.restore(m)
    return row


def plot(result: dict, path: Path) -> None:
    """Cached time over resident (median over blocks) per variant, one group of bars per row."""
    from hf_moe_opt.benchmarking.common import plot_stack_bars

    rows = result["rows"]
    labels = [f"{r['family']} b{r['batch']}\n{r['fraction_resident']:.0%} resident" for r in rows]
    title = f"cached one-token steps, MoE-only stack (paired blocks), {result['environment']['device']}"
    plot_stack_bars(rows, "x_resident_block_median", labels, path, ylabel="x resident time", title=title, target=1.5)


def main(argv: list[str] | None = None) -> int:
    from hf_moe_opt.benchmarking.common import add_stack_probe_args, probe_device, save_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_probe_args(p, warmup=200, steps=400)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 1.0])
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    device = probe_device(args.smoke, "probe_slot_lookup.py")
    if device is None:
        return 1
    import bench_cache

    rows = []
    for family in args.families:
        layers = 4 if family == "switch" else 2
        for batch in args.batches:
            for fraction in args.fractions:
                row = run(family, layers, batch, fraction, args.policy, args.warmup, args.steps, args.block,
                          device, args.smoke)  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        save_result({"environment": bench_cache.environment(), "rows": rows}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
