"""Routing metadata for dynamic gating, computed on the device without host synchronisation.

A token routed to ``k`` experts makes ``k`` *assignments*; assignment ``a = token * k + slot``.
The plan sorts the assignments by expert (stably, so earlier tokens come first inside a group).
Assignments the router dropped (capacity, padding, random second expert) sort behind every
expert's group and are never computed: capacity is a mask on this metadata, not padding.

Nothing here calls ``.item()``, ``.tolist()``, ``nonzero`` or ``bincount``, so a forward built on
it can be captured in a CUDA graph for fixed shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    def kept_rows(self) -> torch.Tensor:
        """``[A]`` bool, True for rows an expert computes."""
        return self.expert < self.num_experts


def make_plan(expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Build the plan from the router's choices.

    Args:
        expert_index: ``[N, k]`` integer expert choices.
        gates: ``[N, k]`` combine weights.
        keep: ``[N, k]`` bool, False for assignments the router dropped.
        num_experts: ``E``.
    """
    if expert_index.shape != keep.shape or expert_index.shape != gates.shape:
        raise ValueError(
            f"expert_index {tuple(expert_index.shape)}, gates {tuple(gates.shape)} and keep "
            f"{tuple(keep.shape)} must have the same [tokens, top_k] shape"
        )
    num_tokens, top_k = expert_index.shape
    key = torch.where(keep, expert_index.long(), num_experts).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    # Scatter-add histogram: unlike bincount it needs no host round trip.
    hist = torch.zeros(num_experts + 1, dtype=torch.int32, device=key.device)
    hist.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    counts = hist[:num_experts]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate = torch.where(keep, gates, torch.zeros_like(gates)).reshape(-1)[order]
    return DispatchPlan(
        order=order,
        token=torch.div(order, top_k, rounding_mode="floor"),
        expert=sorted_key,
        counts=counts,
        offsets=offsets,
        gate=gate,
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
    )
