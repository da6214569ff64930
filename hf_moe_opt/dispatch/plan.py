"""Routing metadata for dynamic gating, computed on the device without host synchronisation.

A token routed to ``k`` experts makes ``k`` *assignments*; assignment ``a = token * k + slot``.
The plan sorts the assignments by expert (stably, so earlier tokens come first inside a group).
Assignments the router dropped (capacity, padding, random second expert) sort behind every
expert's group and are never computed: capacity is a mask on this metadata, not padding.

On CUDA the plan comes from Triton instead (``hf_moe_opt.kernels.plan``, same result): one launch for
small batches, a counting sort in two or three launches for the rest (torch's radix sort of 64-bit
keys costs more than the counting sort). :func:`torch_plan` is the CPU path and the reference.
Nothing here calls ``.item()``, ``.tolist()``, ``nonzero`` or ``bincount``, so a forward built on
it can be captured in a CUDA graph for fixed shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..compiled_kernels import compiled_kernels
from ..grad_mode import records_grad


@dataclass(frozen=True)
class DispatchPlan:
    """Where every assignment goes.

    Attributes:
        order: ``[A]`` int64, assignment index of each sorted row (a permutation of ``range(A)``).
        token: ``[A]`` int64, token index of each sorted row (``order // top_k``).
        expert: ``[A]`` int64, expert of each sorted row; ``num_experts`` for dropped rows.
        counts: ``[E]`` int32, kept rows per expert.
        offsets: ``[E]`` int32, inclusive end of each expert's rows (``torch._grouped_mm`` format).
            Rows at or after ``offsets[-1]`` are dropped assignments.
        gate: ``[A]`` combine weight of each sorted row (0 for dropped rows), router dtype rules
            already applied by the router.
        num_tokens: ``N``; ``top_k``: assignments per token; ``num_experts``: ``E``.
        may_drop: False when the router dropped nothing (``keep`` was None): kernels may skip masking.
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    gate: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    may_drop: bool = True

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    def kept_rows(self) -> torch.Tensor:
        """``[A]`` bool, True for rows an expert computes."""
        return self.expert < self.num_experts


_EXPERT_IDS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    key = (device, num_experts)
    ids = _EXPERT_IDS.get(key)
    if ids is None:
        ids = _EXPERT_IDS[key] = torch.arange(num_experts, device=device)
    return ids


@functools.cache
def _fused_planner():
    """The Triton planners for CUDA (``hf_moe_opt.kernels.plan``), if Triton compiles."""
    return compiled_kernels("plan")


def make_plan(
    expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """Build the plan from the router's choices.

    Args:
        expert_index: ``[N, k]`` integer expert choices.
        gates: ``[N, k]`` combine weights.
        keep: ``[N, k]`` bool, False for assignments the router dropped; None when nothing was dropped.
        num_experts: ``E``.
    """
    if expert_index.shape != gates.shape or (keep is not None and keep.shape != expert_index.shape):
        raise ValueError(
            f"expert_index {tuple(expert_index.shape)}, gates {tuple(gates.shape)} and keep "
            f"{None if keep is None else tuple(keep.shape)} must have the same [tokens, top_k] shape"
        )
    # The fused planners sort the gates in a kernel (no backward): with autograd on, torch's ops.
    if expert_index.is_cuda and not records_grad(gates):
        planner = _fused_planner()
        if planner is not None:
            num_rows = expert_index.numel()
            if planner.fits(num_rows, num_experts):
                return planner.fused_plan(expert_index, gates, keep, num_experts)
            if planner.fits_large(num_rows, num_experts):
                return planner.large_plan(expert_index, gates, keep, num_experts)
    return torch_plan(expert_index, gates, keep, num_experts)


def torch_plan(
    expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """:func:`make_plan` in torch on any device (the CPU path and the Triton planners' reference)."""
    num_tokens, top_k = expert_index.shape
    if keep is None:
        key = expert_index.reshape(-1).long()
        flat_gates = gates.reshape(-1)
    else:
        key = torch.where(keep, expert_index.long(), num_experts).reshape(-1)
        flat_gates = torch.where(keep, gates, torch.zeros((), dtype=gates.dtype, device=gates.device)).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    # Group ends by binary search in the sorted keys: no atomics, no host round trip (unlike bincount).
    offsets = torch.searchsorted(sorted_key, _expert_ids(num_experts, key.device), right=True, out_int32=True)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return DispatchPlan(
        order=order,
        token=order if top_k == 1 else torch.div(order, top_k, rounding_mode="floor"),
        expert=sorted_key,
        counts=counts,
        offsets=offsets,
        gate=flat_gates[order],
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        may_drop=keep is not None,
    )
