"""The dispatch plan of a small batch in one Triton program (decode steps).

``make_plan`` in torch takes a sort, a binary search, a difference and two gathers: half a dozen
kernels, each costing more to launch than to run when a decode step routes a few dozen assignments.
Here one program computes the same plan: the rank of each assignment in the stable sort by expert is
the number of assignments with a smaller key plus those with an equal key and a smaller index (an
``A x A`` comparison), and the group sizes come from an ``E x A`` comparison. The outputs equal
``make_plan``'s exactly.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..dispatch.plan import DispatchPlan

# One program holds an [A, A] and an [E, A] comparison in registers.
MAX_ROWS = 128
MAX_EXPERTS = 512


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
):
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


def fused_plan(
    expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """``make_plan`` for small batches in one launch; same arguments, identical result."""
    num_tokens, top_k = expert_index.shape
    num_rows = num_tokens * top_k
    if not fits(num_rows, num_experts):
        raise ValueError(f"fused_plan handles 1..{MAX_ROWS} assignments and <= {MAX_EXPERTS} experts")
    device = expert_index.device
    order = torch.empty(num_rows, dtype=torch.int64, device=device)
    token = torch.empty_like(order)
    expert = torch.empty_like(order)
    gate = torch.empty(num_rows, dtype=gates.dtype, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty_like(counts)
    keep_arg = keep.reshape(-1).view(torch.uint8) if keep is not None else order  # placeholder, never read
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _plan_kernel[(1,)](
            expert_index.reshape(-1),
            gates.reshape(-1),
            keep_arg,
            order,
            token,
            expert,
            gate,
            counts,
            offsets,
            num_rows,
            num_experts,
            top_k,
            HAS_KEEP=keep is not None,
            BLOCK_A=max(triton.next_power_of_2(num_rows), 16),
            BLOCK_E=max(triton.next_power_of_2(num_experts), 16),
            num_warps=4,
        )
    return DispatchPlan(
        order=order,
        token=token,
        expert=expert,
        counts=counts,
        offsets=offsets,
        gate=gate,
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        may_drop=keep is not None,
    )
