"""Where a cached step's expert loads lose their rate: the copy engine's own times (CUPTI) against the cache's clock.

    python benchmarks/probe_copy_dma.py --family switch --out copy_dma_h200.json

The cache times each load batch with CUDA events on its copy stream (``hf_moe_opt.stats``'
``copy_time_ms``). This runs ``bench_cache.py``'s MoE-only stack cached (warmed, stats reset), a
few hundred decode steps timed by the cache's events, then as many steps of fresh tokens under
``torch.profiler``, and reads from the trace every host-to-device copy of at least 1 MB
(:func:`hf_moe_opt.benchmarking.copy_trace.h2d_copies`): its duration on the device and bytes (the
DMA's own rate), the span of each load batch, the gap between the copies of one batch and the
delay from the host's copy call to the copy's start. Printed beside the events' rate and a 1 GiB
pinned copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hf_moe_opt.benchmarking.common import json_out  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plot(results: list[dict], path: Path) -> None:
    """Rates over the 1 GiB pinned rate: the copy engine's (per copy, per load batch) and the cache's events."""
    from hf_moe_opt.benchmarking.common import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return
    bars = [
        ("copy engine (trace)", lambda r: r["trace"]["dma_bytes_per_s"]),
        ("load batch span (trace)", lambda r: r["trace"]["batch_span_bytes_per_s"]),
        ("cache events", lambda r: r["events_bytes_per_s"]),
    ]
    fig, ax = plt.subplots(figsize=(2.5 * len(results) + 2, 4))
    width = 0.8 / len(bars)
    for b, (label, rate) in enumerate(bars):
        xs = [i + b * width for i in range(len(results))]
        ax.bar(xs, [(rate(r) or 0.0) / r["pinned_h2d_bytes_per_s"] for r in results], width, label=label)
    ax.axhline(0.85, ls="--", color="gray", lw=1, label="85%")
    ax.set(
        xticks=[i + 0.4 - width / 2 for i in range(len(results))],
        xticklabels=[f"{r['family']} shape, batch {r['batch']}" for r in results],
        ylabel="fraction of the 1 GiB pinned rate",
        ylim=(0, 1.1),
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"cached expert loads, {results[0]['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    import bench_cache

    import hf_moe_opt
    from hf_moe_opt.benchmarking.copy_trace import trace_copies

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["switch", "nllb"], default="switch")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--policy", default="adaptive")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gap-us", type=float, default=50.0, help="copies closer than this form one load batch")
    p.add_argument("--out", type=json_out)
    p.add_argument("--replot", type=Path, nargs="+", help="only draw the plot of result JSONs (to the first's .png)")
    args = p.parse_args(argv)
    if args.replot:
        plot([json.loads(f.read_text()) for f in args.replot], args.replot[0].with_suffix(".png"))
        return 0
    if not torch.cuda.is_available():
        print("probe_copy_dma.py needs CUDA")
        return 0
    device = torch.device("cuda")
    layers = 4 if args.family == "switch" else 2
    torch.manual_seed(0)
    with torch.device(device):
        model = bench_cache.MoEStack(args.family, layers).to(torch.bfloat16).eval()
    bench_cache._optimize(model, capacity="none", expert_cache=args.fraction, cache_policy=args.policy)
    stream = bench_cache.token_stream(model.d_model, args.batch, args.warmup + args.steps, device, seed=args.batch)
    for x in stream[: args.warmup]:
        model(x)
    torch.cuda.synchronize()
    hf_moe_opt.reset_stats(model)

    def steps(xs: list[torch.Tensor]) -> None:
        for x in xs:
            model(x)

    # The cache's own clock without the profiler (which slows the host down), then as many steps of
    # fresh tokens traced (the same ones again would find their experts resident: nothing to copy).
    steps(stream[args.warmup :])
    torch.cuda.synchronize()
    fresh = bench_cache.token_stream(model.d_model, args.batch, args.steps, device, seed=args.batch + 1000)
    stats = hf_moe_opt.stats(model)
    copied = sum(s["bytes_copied"] for s in stats.values())
    copy_ms = sum(s["copy_time_ms"] for s in stats.values())
    found = trace_copies(lambda: steps(fresh), min_bytes=1 << 20, gap_us=args.gap_us)
    pinned = bench_cache.pinned_bandwidth(device)["pinned_h2d_bytes_per_s"]
    result = {
        "command": " ".join(sys.argv),
        "environment": bench_cache.environment(),
        "family": args.family,
        "batch": args.batch,
        "fraction_resident": args.fraction,
        "policy": args.policy,
        "pinned_h2d_bytes_per_s": pinned,
        "events_bytes_per_s": copied / (copy_ms * 1e-3) if copy_ms else None,
        "events_bytes": copied,
        "trace": found,
    }
    print(json.dumps(result, indent=1))
    for key in ("dma_bytes_per_s", "batch_span_bytes_per_s"):
        if found.get(key) and pinned:
            print(f"{key}: {found[key] / 1e9:.1f} GB/s = {found[key] / pinned:.1%} of pinned")
    if result["events_bytes_per_s"]:
        print(f"events: {result['events_bytes_per_s'] / 1e9:.1f} GB/s = {result['events_bytes_per_s'] / pinned:.1%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
