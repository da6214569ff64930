"""A read-only memory stream for the bandwidth ceiling.

The expert kernels stream weights and write little. On an H200 they read faster (4.3-4.4 TB/s at
small batches) than a device copy moves bytes (read + write, about 4.0 TB/s) or than torch's
reductions read (3.7 TB/s), so a floor built on those rates can be beaten. This kernel reads a
buffer once with wide loads and many programs in flight and sums it, which is the pattern to beat.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    triton = None

# (elements per load, loads per program, warps): a few shapes, the fastest counts.
CONFIGS = ((4096, 8, 8), (8192, 4, 8), (2048, 16, 4), (16384, 4, 16))

if triton is not None:

    @triton.jit
    def _stream_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, LOADS: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK * LOADS
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(LOADS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def stream_sum(x: torch.Tensor, block: int, loads: int, warps: int) -> torch.Tensor:
    """Per-program partial sums of contiguous ``x`` (their total is ``x.sum()``), read once."""
    if triton is None:
        raise RuntimeError("the read probe needs triton")
    flat = x.reshape(-1)
    programs = triton.cdiv(flat.numel(), block * loads)
    out = torch.empty(programs, dtype=torch.float32, device=x.device)
    _stream_sum[(programs,)](flat, out, flat.numel(), BLOCK=block, LOADS=loads, num_warps=warps)
    return out


def read_rates(x: torch.Tensor, time_ms) -> list[float]:
    """Bytes per second of each :data:`CONFIGS` stream over ``x``; ``time_ms(fn)`` times a call.
    Empty where triton is missing or ``x`` is not on a GPU (the interpreter is no probe)."""
    if triton is None or x.device.type != "cuda":
        return []
    nbytes = x.numel() * x.element_size()
    return [nbytes / (time_ms(lambda c=c: stream_sum(x, *c)) * 1e-3) for c in CONFIGS]
