"""Can a decode-step kernel read a missing expert straight from pinned host memory?

    PYTHONPATH=$PWD python benchmarks/probe_zero_copy.py --out benchmarks/results/zero_copy_h200.json

An expert cache that copies a missing expert before computing it makes the step wait for a host
decision (which experts to copy) and then for the copy. A kernel that reads a missing expert's
weights over the host link itself (pinned memory is addressable from the GPU under unified
addressing) needs neither: the host could refill the slots afterwards, off the critical path. That
only pays if such reads run near the host-to-device copy rate. This probe measures, for the expert
shapes of switch-base-128 (two 3072 x 768 matrices) and nllb-moe-54b (two 8192 x 2048), in one run:

* ``copy``: ``slot.copy_(host, non_blocking=True)`` of one expert (what the cache does now);
* ``gemv_device``: a one-token product ``W @ x`` over both matrices in device memory (a resident hit);
* ``gemv_host``: the same kernel reading ``W`` from the pinned host tensor through its address,
  for a few block shapes (more loads in flight hide more of the link's latency);

CUDA events, warm-up, medians of ``--repeats``; bytes per second of each, and the 1 GiB pinned copy
rate of the same run as the reference. Each product's largest error against a float32 reference is
recorded (``*_max_rel_error``); a block shape whose products are wrong is reported, not kept quiet.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from hf_moe_opt.benchmarking.common import json_out

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the probe needs triton
    triton = None

SHAPES = {"switch-base-128": (3072, 768), "nllb-moe-54b": (8192, 2048)}
BLOCKS = [(16, 256, 4), (32, 256, 4), (64, 128, 4), (16, 512, 8)]  # (rows, columns, warps) per program


if triton is not None:

    @triton.jit
    def _gemv(w_addr, x_ptr, y_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # w_addr: the address of a row-major [n, k] bfloat16 matrix, device or pinned host memory.
        w_ptr = w_addr.to(tl.pointer_type(tl.bfloat16))
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            inside = (rows[:, None] < n) & (cols[None, :] < k)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * k + cols[None, :], mask=inside, other=0.0)
            x = tl.load(x_ptr + cols, mask=cols < k, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
        tl.store(y_ptr + rows, acc, mask=rows < n)


def gemv(address: int, x: torch.Tensor, n: int, k: int, block: tuple[int, int, int]) -> torch.Tensor:
    """``W @ x`` for the row-major ``[n, k]`` bfloat16 matrix at ``address``."""
    block_n, block_k, warps = block
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    _gemv[(triton.cdiv(n, block_n),)](address, x, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def timed_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pinned_copy_rate(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / (timed_ms(lambda: dst.copy_(src, non_blocking=True), 5) * 1e-3)


def probe_shape(name: str, n: int, k: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    host = [torch.randn(n, k, generator=g).to(torch.bfloat16).pin_memory() for _ in range(2)]
    device = [h.cuda() for h in host]
    x = torch.randn(k, generator=g).to(torch.bfloat16).cuda()
    nbytes = sum(h.numel() * h.element_size() for h in host)
    slots = [torch.empty_like(d) for d in device]

    def copy() -> None:
        for s, h in zip(slots, host, strict=True):
            s.copy_(h, non_blocking=True)

    row = {"shape": name, "matrices": [n, k], "expert_bytes": nbytes}
    row["copy_bytes_per_s"] = nbytes / (timed_ms(copy, repeats) * 1e-3)
    row["gemv"] = []
    reference = [d.float() @ x.float() for d in device]
    for block in BLOCKS:
        entry = {"block": list(block)}
        for where, mats in (("device", device), ("host", host)):

            def run(mats=mats, block=block) -> list[torch.Tensor]:
                return [gemv(m.data_ptr(), x, n, k, block) for m in mats]

            entry[f"{where}_bytes_per_s"] = nbytes / (timed_ms(run, repeats) * 1e-3)
            entry[f"{where}_max_rel_error"] = max(
                ((y - r).abs().max() / r.abs().max()).item() for y, r in zip(run(), reference, strict=True)
            )
        if max(entry["device_max_rel_error"], entry["host_max_rel_error"]) > 1e-2:
            print(f"  WRONG PRODUCTS with block {block}: errors {entry['device_max_rel_error']:.3g} / "
                  f"{entry['host_max_rel_error']:.3g}", flush=True)  # fmt: skip
        row["gemv"].append(entry)
        rates = (entry["device_bytes_per_s"] / 1e9, entry["host_bytes_per_s"] / 1e9, row["copy_bytes_per_s"] / 1e9)
        print(f"{name} block {block}: device {rates[0]:.0f} GB/s, host (zero-copy) {rates[1]:.1f} GB/s, "
              f"copy {rates[2]:.1f} GB/s", flush=True)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=json_out, default="benchmarks/results/zero_copy.json")
    args = p.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        print("error: this probe needs triton and a CUDA device", file=sys.stderr)
        return 2
    from hf_moe_opt.benchmarking.common import environment, save_result

    env = environment()
    rate = pinned_copy_rate()
    print(f"{env['device']}: 1 GiB pinned host-to-device copy {rate / 1e9:.1f} GB/s", flush=True)
    rows = [probe_shape(name, n, k, args.repeats) for name, (n, k) in SHAPES.items()]
    for row in rows:
        row["copy_vs_pinned"] = row["copy_bytes_per_s"] / rate
        for entry in row["gemv"]:
            entry["host_vs_pinned"] = entry["host_bytes_per_s"] / rate
    save_result({"environment": env, "pinned_h2d_bytes_per_s": rate, "shapes": rows}, args.out, plot)
    return 0


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, copy, host = [], [], []
    for row in result["shapes"]:
        for entry in row["gemv"]:
            labels.append(f"{row['shape']}\n{tuple(entry['block'])}")
            copy.append(row["copy_bytes_per_s"] / 1e9)
            host.append(entry["host_bytes_per_s"] / 1e9)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], copy, width=0.4, label="copy into a slot")
    ax.bar([x + 0.2 for x in xs], host, width=0.4, label="one-token product read from pinned host memory")
    ax.axhline(result["pinned_h2d_bytes_per_s"] / 1e9, color="k", ls="--", label="1 GiB pinned copy")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set(ylabel="GB/s", title=f"reading a missing expert, {result['environment']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
