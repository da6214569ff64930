"""Host-to-device copies as the copy engine ran them, read from a ``torch.profiler`` (CUPTI) trace.

An expert cache times each load batch with CUDA events on its copy stream. The start event is passed
as soon as the stream reaches it, while the host is still submitting the batch's copies, so that clock
includes the submission (tens of microseconds a batch) and reads small loads below the rate the copy
engine reaches. The trace records each copy's own start, duration and bytes.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    values = sorted(values)
    at = [values[min(len(values) - 1, int(q * len(values)))] for q in (0.1, 0.9)]
    return {"n": len(values), "median": statistics.median(values), "p10": at[0], "p90": at[1]}


def h2d_copies(trace: dict, min_bytes: int = 1 << 20, gap_us: float = 50.0) -> dict:
    """Host-to-device copies of at least ``min_bytes`` in a Chrome trace of ``torch.profiler``.

    Returns the copies' count and bytes; ``dma_bytes_per_s`` (bytes over the copies' summed device
    durations); load batches (copies less than ``gap_us`` apart) and ``batch_span_bytes_per_s`` (bytes
    over the batches' first-start-to-last-end spans); the per-copy rate and duration, the gap between
    copies of one batch and the delay from the host's copy call to the copy's start (medians, 10th and
    90th percentiles; microseconds).
    """
    events = trace.get("traceEvents", [])
    copies = sorted(
        (
            e
            for e in events
            if e.get("cat") == "gpu_memcpy"
            and "HtoD" in e.get("name", "")
            and int(e.get("args", {}).get("bytes", 0)) >= min_bytes
        ),
        key=lambda e: e["ts"],
    )
    calls = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "Memcpy" in e.get("name", "") and "correlation" in e.get("args", {})
    }
    batches: list[list[dict]] = []
    for e in copies:
        if batches and e["ts"] - (batches[-1][-1]["ts"] + batches[-1][-1]["dur"]) < gap_us:
            batches[-1].append(e)
        else:
            batches.append([e])
    total = sum(int(e["args"]["bytes"]) for e in copies)
    busy_us = sum(e["dur"] for e in copies)
    span_us = sum(b[-1]["ts"] + b[-1]["dur"] - b[0]["ts"] for b in batches)
    return {
        "copies": len(copies),
        "batches": len(batches),
        "bytes": total,
        "dma_bytes_per_s": total / (busy_us * 1e-6) if busy_us > 0 else None,
        "batch_span_bytes_per_s": total / (span_us * 1e-6) if span_us > 0 else None,
        "copy_bytes_per_s": _quantiles([int(e["args"]["bytes"]) / (e["dur"] * 1e-6) for e in copies if e["dur"] > 0]),
        "copy_us": _quantiles([e["dur"] for e in copies]),
        "gap_inside_batch_us": _quantiles(
            [b[i + 1]["ts"] - (b[i]["ts"] + b[i]["dur"]) for b in batches for i in range(len(b) - 1)]
        ),
        "call_to_start_us": _quantiles(
            [e["ts"] - calls[e["args"]["correlation"]] for e in copies if e["args"].get("correlation") in calls]
        ),
    }


def trace_copies(fn: Callable[[], object], min_bytes: int = 1 << 20, gap_us: float = 50.0) -> dict:
    """Run ``fn`` under ``torch.profiler`` (CPU and CUDA activity) and return :func:`h2d_copies` of it."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return h2d_copies(trace, min_bytes, gap_us)
