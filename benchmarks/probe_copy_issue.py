"""How fast does an expert load run when issued the way a cached decode step issues it?

    PYTHONPATH=$PWD python benchmarks/probe_copy_issue.py --out benchmarks/results/copy_issue_h200.json

The expert cache copies a missing expert (one tensor per weight stack: two for Switch and NLLB-MoE)
from pinned host memory into a device slot on a side stream, right after the host has read the
router's choices, so the copy stream is idle when the copies are issued. One expert copied alone and
timed in a loop reaches ~95% of the 1 GiB pinned rate; inside the cache the copies measured 83-93%.
This probe separates the candidate causes, for the expert shapes of switch-base-128 and
nllb-moe-54b and 1, 2 and 4 experts per step, each timed from an idle device (synchronised first):

* ``loop``: one ``copy_(non_blocking=True)`` per tensor from Python (what the cache does);
* ``foreach``: the same copies in one ``torch._foreach_copy_`` call (no Python between them);
* ``contiguous``: the same bytes as one copy per expert (a layout where an expert is one block);
* ``loop_busy``: ``loop`` while a kernel on the compute stream streams device memory (as the hits
  of a step compute beside its misses' copies): does device-memory traffic slow the copy engine?
* ``loop_wait``: ``loop`` after the copy stream was made to wait for the (idle) compute stream, as
  the cache does before every load: does a satisfied cross-stream dependency delay the copy?

For each: the copy stream's own time (CUDA events around the copies) and the host's issue-to-done
time (``perf_counter`` from before the first copy call to the end event's completion). Bytes per
second and the fraction of the 1 GiB pinned copy rate measured in the same run; medians of
``--repeats`` after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_moe_opt.benchmarking.common import environment, json_out, pyplot_or_none, save_result

SHAPES = {"switch-base-128": [(3072, 768), (768, 3072)], "nllb-moe-54b": [(8192, 2048), (2048, 8192)]}


def pinned_rate(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of one 1 GiB pinned host-to-device copy (median of 5, CUDA events)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return nbytes / statistics.median(times[1:])


def time_loads(issue, stream: torch.cuda.Stream, busy, repeats: int, wait: bool = False) -> tuple[float, float]:
    """Median (event seconds, host issue-to-done seconds) of ``issue()`` on ``stream`` from an idle device
    (``wait``: the copy stream first waits for the compute stream, as the cache's loads do)."""
    events, walls = [], []
    for _ in range(repeats + 3):
        torch.cuda.synchronize()
        if busy is not None:
            busy()  # queued on the compute stream; runs while the copies do
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if wait:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            start.record(stream)
            issue()
            end.record(stream)
        end.synchronize()
        walls.append(time.perf_counter() - t0)
        events.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(events[3:]), statistics.median(walls[3:])


def probe_shape(name: str, experts: int, device: torch.device, repeats: int, rate: float) -> list[dict]:
    dtype = torch.bfloat16
    shapes = SHAPES[name]
    slots = 8
    hosts = [torch.randn(slots, *s, dtype=dtype).pin_memory() for s in shapes]
    devs = [torch.empty(slots, *s, dtype=dtype, device=device) for s in shapes]
    per_expert = sum(a * b for a, b in shapes)
    flat_host = torch.randn(slots, per_expert, dtype=dtype).pin_memory()
    flat_dev = torch.empty(slots, per_expert, dtype=dtype, device=device)
    nbytes = experts * per_expert * 2
    pairs = [(d[j], h[j]) for j in range(experts) for d, h in zip(devs, hosts, strict=True)]
    stream = torch.cuda.Stream(device=device)
    big = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB streamed by the busy kernel

    def loop():
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)

    def foreach():
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs], non_blocking=True)

    def contiguous():
        for j in range(experts):
            flat_dev[j].copy_(flat_host[j], non_blocking=True)

    def busy():
        big.mul_(1.0)

    rows = []
    for method, issue, load, wait in (
        ("loop", loop, None, False),
        ("foreach", foreach, None, False),
        ("contiguous", contiguous, None, False),
        ("loop_busy", loop, busy, False),
        ("loop_wait", loop, None, True),
    ):
        ev, wall = time_loads(issue, stream, load, repeats, wait)
        rows.append(
            {
                "shape": name,
                "experts": experts,
                "method": method,
                "bytes": nbytes,
                "event_s": ev,
                "issue_to_done_s": wall,
                "event_vs_pinned": nbytes / ev / rate,
                "issue_to_done_vs_pinned": nbytes / wall / rate,
                "floor_s": nbytes / rate,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for dst, src in pairs:  # the copies must have landed where they were meant to
        assert torch.equal(dst.cpu(), src), "a copy wrote the wrong data"
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", type=json_out, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_copy_issue: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rate = pinned_rate(device)
    print(f"# 1 GiB pinned copy: {rate / 1e9:.1f} GB/s (the floor of every row is bytes / this rate)")
    rows = [r for name in SHAPES for k in args.experts for r in probe_shape(name, k, device, args.repeats, rate)]
    result = {"environment": environment(), "pinned_bytes_per_s": rate, "rows": rows}
    if args.out is not None:
        save_result(result, args.out, plot)
    return 0


def plot(result: dict, path: Path) -> None:
    """Fraction of the pinned rate per method, one panel per expert shape, bars by experts per step."""
    plt = pyplot_or_none()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        counts = list(dict.fromkeys(r["experts"] for r in rows))
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            for key, hatch in (("event_vs_pinned", None), ("issue_to_done_vs_pinned", "//")):
                vals = [next(r[key] for r in rows if r["method"] == method and r["experts"] == k) for k in counts]
                xs = [i + m * width for i in range(len(counts))]
                ax.bar(
                    xs,
                    vals,
                    width * (0.5 if hatch else 1.0),
                    color=f"C{m}",
                    hatch=hatch,
                    label=method if hatch is None else None,
                    alpha=0.6 if hatch else 1.0,
                )
        ax.axhline(0.85, ls="--", color="gray", lw=1)
        ax.set(
            xticks=[i + 0.4 - width / 2 for i in range(len(counts))],
            xticklabels=[f"{k} expert(s)" for k in counts],
            ylim=(0, 1.05),
            ylabel="fraction of 1 GiB pinned rate",
            title=f"{shape} (hatched: host issue-to-done)",
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"expert loads issued from an idle device, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
