"""Where a cached step's expert loads lose their rate: the copy engine's own times (CUPTI) against the cache's clock.

    python benchmarks/probe_copy_dma.py --family switch --out copy_dma_h200.json

The cache times each load batch with CUDA events on its copy stream (``hf_moe_opt.stats``'
``copy_time_ms``). This runs ``bench_cache.py``'s MoE-only stack cached (warmed, stats reset), then a
few hundred decode steps under ``torch.profiler`` and reads, from its trace, every host-to-device
copy of at least 1 MB: its duration on the device and bytes (the DMA's own rate), the span of each
load batch (copies closer than ``--gap-us`` apart: first start to last end), the gap between the
copies of one batch, and the delay from the host's copy call to the copy's start. Printed beside the
events' rate over the same steps and a 1 GiB pinned copy measured in the same run. torch.profiler
adds host overhead, so the decode time here is not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "median": statistics.median(values), "p10": pick(0.1), "p90": pick(0.9)}


def analyse(trace: dict, min_bytes: int, gap_us: float) -> dict:
    """Host-to-device copies of at least ``min_bytes`` in a Chrome trace from torch.profiler."""
    events = trace.get("traceEvents", [])
    copies = sorted(
        (e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")),
        key=lambda e: e["ts"],
    )
    copies = [e for e in copies if int(e.get("args", {}).get("bytes", 0)) >= min_bytes]
    calls = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") == "cuda_runtime" and "Memcpy" in e.get("name", "") and "correlation" in e.get("args", {})
    }
    rates = [e["args"]["bytes"] / (e["dur"] * 1e-6) for e in copies if e["dur"] > 0]
    delays = [e["ts"] - calls[e["args"]["correlation"]]["ts"] for e in copies if e["args"].get("correlation") in calls]
    batches: list[list[dict]] = []
    for e in copies:
        if batches and e["ts"] - (batches[-1][-1]["ts"] + batches[-1][-1]["dur"]) < gap_us:
            batches[-1].append(e)
        else:
            batches.append([e])
    spans = [b[-1]["ts"] + b[-1]["dur"] - b[0]["ts"] for b in batches]
    batch_bytes = [sum(e["args"]["bytes"] for e in b) for b in batches]
    inner_gaps = [b[i + 1]["ts"] - (b[i]["ts"] + b[i]["dur"]) for b in batches for i in range(len(b) - 1)]
    total_bytes, busy_us = sum(batch_bytes), sum(e["dur"] for e in copies)
    return {
        "copies": len(copies),
        "batches": len(batches),
        "bytes": total_bytes,
        "dma_bytes_per_s": total_bytes / (busy_us * 1e-6) if busy_us else None,
        "batch_span_bytes_per_s": total_bytes / (sum(spans) * 1e-6) if spans else None,
        "copy_bytes_per_s": _quantiles(rates),
        "copy_us": _quantiles([e["dur"] for e in copies]),
        "gap_inside_batch_us": _quantiles(inner_gaps),
        "call_to_start_us": _quantiles(delays),
    }


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    import bench_cache

    import hf_moe_opt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["switch", "nllb"], default="switch")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--policy", default="adaptive")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gap-us", type=float, default=50.0, help="copies closer than this form one load batch")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
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
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for x in stream[args.warmup :]:
            model(x)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    stats = hf_moe_opt.stats(model)
    copied = sum(s["bytes_copied"] for s in stats.values())
    copy_ms = sum(s["copy_time_ms"] for s in stats.values())
    pinned = bench_cache.pinned_bandwidth(device)["pinned_h2d_bytes_per_s"]
    expert_bytes = next(iter(stats.values()))["slot_bytes"] // max(1, int(args.fraction * 128))
    found = analyse(trace, min_bytes=min(1 << 20, expert_bytes // 4), gap_us=args.gap_us)
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
