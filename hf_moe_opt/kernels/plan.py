"""The dispatch plan in Triton: one program for small batches (decode steps), a counting sort for large ones.

``make_plan`` in torch takes a sort, a binary search, a difference and two gathers: half a dozen
kernels, each costing more to launch than to run when a decode step routes a few dozen assignments.
Here one program computes the same plan: the rank of each assignment in the stable sort by expert is
the number of assignments with a smaller key plus those with an equal key and a smaller index (an
``A x A`` comparison), and the group sizes come from an ``E x A`` comparison. The outputs equal
``make_plan``'s exactly.

Large batches (prefill, big decode batches) take :func:`large_plan`, a stable counting sort over the
``E + 1`` keys (experts, then "dropped"). torch's path spends most of its time in a radix sort of
64-bit keys; a counting sort needs one histogram per chunk of ``C`` assignments, a prefix over the
chunks per key, and a scatter:

1. ``_hist_kernel``, one program per chunk: the chunk's histogram (``tl.histogram``).
2. ``_scan_kernel``, one program per block of keys: the exclusive prefix of the histograms over the
   chunks, in place, and the per-key totals. Skipped for small tables: the scatter then sums the
   histograms of the earlier chunks itself (two launches instead of three).
3. ``_scatter_kernel``, one program per chunk: sorts ``key * C + index`` inside the chunk (bitonic,
   in registers), so the sorted position minus the chunk's start of the key is the stable rank among
   equal keys; the destination adds the key's global start and the earlier chunks' count of the key.
   Rows of one key land on consecutive destinations (coalesced stores). Program 0 writes the counts
   and offsets.

No global atomics (``tl.histogram`` counts in shared memory: integer counts, whatever the order),
no host synchronisation, a grid that depends only on shapes: deterministic and capturable in a CUDA
graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..dispatch.plan import DispatchPlan
from .launch import cdiv, launch, next_power_of_2
from .pdl import launch_options, wait_for_producer

# One program holds an [A, A] and an [E, A] comparison in registers.
MAX_ROWS = 128
MAX_EXPERTS = 512
# The counting sort packs ``key * chunk + index`` into int32 and keeps ``E + 2`` bins in registers;
# the [chunks, bins] table is addressed in int32.
LARGE_MAX_EXPERTS = 1024
LARGE_MAX_ROWS = 2**28
# The scatter sums the earlier chunks' histograms itself (no scan launch) up to this many table cells.
INLINE_SCAN_CELLS = 16384


@triton.jit
def _plan_kernel(
    index_ptr,
    gates_ptr,
    keep_ptr,
    order_ptr,
    token_ptr,
    expert_ptr,
    gate_out_ptr,
    counts_ptr,
    offsets_ptr,
    num_rows,
    num_experts,
    top_k,
    HAS_KEEP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    a = tl.arange(0, BLOCK_A)
    valid = a < num_rows
    key = tl.load(index_ptr + a, mask=valid, other=0).to(tl.int32)
    gate = tl.load(gates_ptr + a, mask=valid, other=0.0)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + a, mask=valid, other=0) != 0
        key = tl.where(kept, key, num_experts)
        gate = tl.where(kept, gate, tl.zeros_like(gate))
    key = tl.where(valid, key, num_experts + 1)  # padding lanes sort behind everything
    before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (a[None, :] < a[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(order_ptr + rank, a.to(tl.int64), mask=valid)
    tl.store(token_ptr + rank, (a // top_k).to(tl.int64), mask=valid)
    tl.store(expert_ptr + rank, key.to(tl.int64), mask=valid)
    tl.store(gate_out_ptr + rank, gate, mask=valid)
    e = tl.arange(0, BLOCK_E)
    counts = tl.sum((key[None, :] == e[:, None]).to(tl.int32), axis=1)
    offsets = tl.cumsum(counts, axis=0)
    tl.store(counts_ptr + e, counts, mask=e < num_experts)
    tl.store(offsets_ptr + e, offsets, mask=e < num_experts)


def fits(num_rows: int, num_experts: int) -> bool:
    """Whether :func:`fused_plan` handles ``num_rows`` assignments over ``num_experts`` experts."""
    return 0 < num_rows <= MAX_ROWS and num_experts <= MAX_EXPERTS


def _empty_plan(
    expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """A plan of unwritten tensors for the kernels to fill."""
    num_tokens, top_k = expert_index.shape
    num_rows, device = num_tokens * top_k, expert_index.device
    order = torch.empty(num_rows, dtype=torch.int64, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    return DispatchPlan(
        order=order,
        token=torch.empty_like(order),
        expert=torch.empty_like(order),
        counts=counts,
        offsets=torch.empty_like(counts),
        gate=torch.empty(num_rows, dtype=gates.dtype, device=device),
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        may_drop=keep is not None,
    )


def fused_plan(
    expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """``make_plan`` for small batches in one launch; same arguments, identical result."""
    num_tokens, top_k = expert_index.shape
    num_rows = num_tokens * top_k
    if not fits(num_rows, num_experts):
        raise ValueError(f"fused_plan handles 1..{MAX_ROWS} assignments and <= {MAX_EXPERTS} experts")
    device = expert_index.device
    plan = _empty_plan(expert_index, gates, keep, num_experts)
    # The kernels index flat memory: strided views (column slices of a router's output) are copied.
    keep_arg = keep.contiguous().view(-1).view(torch.uint8) if keep is not None else plan.order  # placeholder
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _plan_kernel,
            (1,),
            expert_index.contiguous().view(-1),
            gates.contiguous().view(-1),
            keep_arg,
            plan.order,
            plan.token,
            plan.expert,
            plan.gate,
            plan.counts,
            plan.offsets,
            num_rows,
            num_experts,
            top_k,
            HAS_KEEP=keep is not None,
            BLOCK_A=max(next_power_of_2(num_rows), 16),
            BLOCK_E=max(next_power_of_2(num_experts), 16),
            num_warps=4,
            **launch_options(device),
        )
    return plan


@triton.jit
def _chunk_keys(index_ptr, keep_ptr, start, num_rows, num_experts, HAS_KEEP: tl.constexpr, CHUNK: tl.constexpr):
    """Sort keys of one chunk: the expert, ``E`` if dropped (or out of range), ``E + 1`` past the end."""
    a = start + tl.arange(0, CHUNK)
    valid = a < num_rows
    raw = tl.load(index_ptr + a, mask=valid, other=0)
    # An index outside [0, E) counts as dropped: it must not address a bin or a row out of bounds.
    kept = (raw >= 0) & (raw < num_experts)
    if HAS_KEEP:
        kept = kept & (tl.load(keep_ptr + a, mask=valid, other=0) != 0)
    key = tl.where(kept, raw.to(tl.int32), num_experts)
    return tl.where(valid, key, num_experts + 1)


@triton.jit
def _hist_kernel(
    index_ptr,
    keep_ptr,
    hist_ptr,
    num_rows,
    num_experts,
    HAS_KEEP: tl.constexpr,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    c = tl.program_id(0)
    key = _chunk_keys(index_ptr, keep_ptr, c * CHUNK, num_rows, num_experts, HAS_KEEP, CHUNK)
    b = tl.arange(0, BINS)
    tl.store(hist_ptr + c * BINS + b, tl.histogram(key, BINS), mask=b <= num_experts)


@triton.jit
def _scan_kernel(
    hist_ptr,
    totals_ptr,
    num_chunks,
    num_experts,
    BINS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    # hist[c, k] becomes the count of key k in chunks before c; totals[k] the count in all chunks.
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    real = k <= num_experts
    carry = tl.zeros([BLOCK_K], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        ptrs = hist_ptr + rows[:, None] * BINS + k[None, :]
        mask = (rows < num_chunks)[:, None] & real[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + k, carry, mask=real)


@triton.jit
def _scatter_kernel(
    index_ptr,
    gates_ptr,
    keep_ptr,
    hist_ptr,
    totals_ptr,
    order_ptr,
    token_ptr,
    expert_ptr,
    gate_out_ptr,
    counts_ptr,
    offsets_ptr,
    num_rows,
    num_chunks,
    num_experts,
    top_k,
    HAS_KEEP: tl.constexpr,
    SCAN_HERE: tl.constexpr,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    c = tl.program_id(0)
    start = c * CHUNK
    key = _chunk_keys(index_ptr, keep_ptr, start, num_rows, num_experts, HAS_KEEP, CHUNK)
    b = tl.arange(0, BINS)
    real = b <= num_experts
    if SCAN_HERE:
        # Small table: sum the histograms of the earlier chunks (and of all, for the totals) here.
        before = tl.zeros([BINS], dtype=tl.int32)
        totals = tl.zeros([BINS], dtype=tl.int32)
        for c0 in range(0, num_chunks, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C)
            mask = (rows < num_chunks)[:, None] & real[None, :]
            tile = tl.load(hist_ptr + rows[:, None] * BINS + b[None, :], mask=mask, other=0)
            totals += tl.sum(tile, axis=0)
            before += tl.sum(tl.where((rows < c)[:, None], tile, 0), axis=0)
    else:
        before = tl.load(hist_ptr + c * BINS + b, mask=real, other=0)
        totals = tl.load(totals_ptr + b, mask=real, other=0)
    ends = tl.cumsum(totals, axis=0)
    local = tl.histogram(key, BINS)
    # Destination of the key's first row in this chunk, minus the key's first sorted position here.
    shift = ends - totals + before - (tl.cumsum(local, axis=0) - local)
    # Unique packed values: the sort is by key, then by assignment (stable).
    packed = tl.sort(key * CHUNK + tl.arange(0, CHUNK))
    key = packed // CHUNK
    a = start + packed % CHUNK
    p = tl.arange(0, CHUNK)
    valid = p < num_rows - start  # rows past the end sort last
    dest = p + tl.gather(shift, key, 0)
    gate = tl.load(gates_ptr + a, mask=valid, other=0.0)
    gate = tl.where(key < num_experts, gate, tl.zeros_like(gate))
    tl.store(order_ptr + dest, a.to(tl.int64), mask=valid)
    tl.store(token_ptr + dest, (a // top_k).to(tl.int64), mask=valid)
    tl.store(expert_ptr + dest, key.to(tl.int64), mask=valid)
    tl.store(gate_out_ptr + dest, gate, mask=valid)
    if c == 0:
        expert = b < num_experts
        tl.store(counts_ptr + b, totals, mask=expert)
        tl.store(offsets_ptr + b, ends, mask=expert)


def fits_large(num_rows: int, num_experts: int) -> bool:
    """Whether :func:`large_plan` handles ``num_rows`` assignments over ``num_experts`` experts."""
    return 0 < num_rows <= LARGE_MAX_ROWS and 0 < num_experts <= LARGE_MAX_EXPERTS


def default_chunk(num_rows: int) -> int:
    """Assignments per program: up to about 128 programs (an H200 has 132 SMs), 256 to 2048 rows each."""
    return min(max(next_power_of_2(cdiv(num_rows, 128)), 256), 2048)


def large_plan(
    expert_index: torch.Tensor,
    gates: torch.Tensor,
    keep: torch.Tensor | None,
    num_experts: int,
    *,
    chunk: int | None = None,
    inline_scan: bool | None = None,
) -> DispatchPlan:
    """``make_plan`` for any batch as a counting sort in two or three launches; identical result.

    Args:
        expert_index, gates, keep, num_experts: as for ``make_plan``. Expert indices outside
            ``[0, E)`` count as dropped.
        chunk: assignments per program, a power of two (default :func:`default_chunk`).
        inline_scan: sum the earlier chunks' histograms in the scatter instead of a scan launch
            (default: when the table has at most ``INLINE_SCAN_CELLS`` cells).
    """
    num_tokens, top_k = expert_index.shape
    num_rows = num_tokens * top_k
    if not fits_large(num_rows, num_experts):
        raise ValueError(f"large_plan handles 1..{LARGE_MAX_ROWS} assignments and 1..{LARGE_MAX_EXPERTS} experts")
    chunk = default_chunk(num_rows) if chunk is None else chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    num_chunks = cdiv(num_rows, chunk)
    # Keys 0..E-1 (experts), E (dropped), E + 1 (past the end); at least a warp's worth of bins.
    bins = max(next_power_of_2(num_experts + 2), 32)
    if inline_scan is None:
        inline_scan = num_chunks * (num_experts + 1) <= INLINE_SCAN_CELLS
    device = expert_index.device
    plan = _empty_plan(expert_index, gates, keep, num_experts)
    hist = torch.empty(num_chunks, bins, dtype=torch.int32, device=device)
    totals = torch.empty(bins, dtype=torch.int32, device=device) if not inline_scan else plan.counts  # placeholder
    index = expert_index.contiguous().view(-1)
    keep_arg = keep.contiguous().view(-1).view(torch.uint8) if keep is not None else index  # placeholder, never read
    # Inline scan: [block_c, bins] tiles of the table (4096 cells). Sort and histogram: 4-8 keys a thread.
    block_c = max(min(4096 // bins, next_power_of_2(num_chunks)), 1)
    num_warps = 4 if chunk <= 512 else 8
    pdl = launch_options(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _hist_kernel,
            (num_chunks,),
            index,
            keep_arg,
            hist,
            num_rows,
            num_experts,
            HAS_KEEP=keep is not None,
            CHUNK=chunk,
            BINS=bins,
            num_warps=num_warps,
            **pdl,
        )
        if not inline_scan:
            # [64, 32] tiles down the chunks; one program per 32 keys.
            launch(
                _scan_kernel,
                (cdiv(num_experts + 1, 32),),
                hist,
                totals,
                num_chunks,
                num_experts,
                BINS=bins,
                BLOCK_C=min(next_power_of_2(num_chunks), 64),
                BLOCK_K=32,
                num_warps=4,
                **pdl,
            )
        launch(
            _scatter_kernel,
            (num_chunks,),
            index,
            gates.contiguous().view(-1),
            keep_arg,
            hist,
            totals,
            plan.order,
            plan.token,
            plan.expert,
            plan.gate,
            plan.counts,
            plan.offsets,
            num_rows,
            num_chunks,
            num_experts,
            top_k,
            HAS_KEEP=keep is not None,
            SCAN_HERE=inline_scan,
            CHUNK=chunk,
            BINS=bins,
            BLOCK_C=block_c,
            num_warps=num_warps,
            **pdl,
        )
    return plan
