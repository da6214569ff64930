"""The copy-trace reader behind the cache benchmarks' copy-engine rate, on hand-made traces."""

from __future__ import annotations

import pytest

from hf_moe_opt.benchmarking.copy_trace import h2d_copies, trace_copies

MB = 1 << 20


def _copy(ts, dur, nbytes, corr, name="Memcpy HtoD (Pinned -> Device)"):
    return {"cat": "gpu_memcpy", "name": name, "ts": ts, "dur": dur, "args": {"bytes": nbytes, "correlation": corr}}


def _call(ts, corr):
    return {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": ts, "dur": 3, "args": {"correlation": corr}}


def test_rates_batches_gaps_and_call_delays():
    # Two load batches of two 4 MiB copies (100 us each, 2 us apart), 1 ms apart; a small copy, a
    # device-to-host copy and a kernel that must all be ignored.
    events = [
        _copy(1000, 100, 4 * MB, 1),
        _copy(1102, 100, 4 * MB, 2),
        _copy(2000, 100, 4 * MB, 3),
        _copy(2102, 100, 4 * MB, 4),
        _copy(1500, 5, 1024, 5),
        _copy(1600, 100, 4 * MB, 6, name="Memcpy DtoH (Device -> Pinned)"),
        {"cat": "kernel", "name": "k", "ts": 1300, "dur": 50, "args": {}},
        _call(980, 1),
        _call(990, 2),
        _call(1960, 3),
        _call(1970, 4),
    ]
    got = h2d_copies({"traceEvents": events}, min_bytes=MB, gap_us=50)
    assert got["copies"] == 4 and got["batches"] == 2 and got["bytes"] == 16 * MB
    assert got["dma_bytes_per_s"] == pytest.approx(16 * MB / 400e-6)
    assert got["batch_span_bytes_per_s"] == pytest.approx(16 * MB / 404e-6)
    assert got["copy_us"]["median"] == 100
    assert got["gap_inside_batch_us"] == {"n": 2, "median": 2, "p10": 2, "p90": 2}
    assert sorted([got["call_to_start_us"]["p10"], got["call_to_start_us"]["p90"]]) == [20, 132]
    # A wider gap threshold joins the batches; a higher byte floor drops every copy.
    assert h2d_copies({"traceEvents": events}, min_bytes=MB, gap_us=1000)["batches"] == 1
    empty = h2d_copies({"traceEvents": events}, min_bytes=8 * MB)
    assert empty["copies"] == 0 and empty["dma_bytes_per_s"] is None and empty["copy_us"] == {"n": 0}


def test_trace_copies_runs_the_function_under_the_profiler():
    ran = []
    got = trace_copies(lambda: ran.append(1))
    assert ran == [1] and got["copies"] == 0
