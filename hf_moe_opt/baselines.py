"""Eager baselines to compare against: a *correct* NLLB-MoE block in transformers 4.57's loop structure.

transformers 5.0-5.24 ship an NLLB-MoE expert loop that only ever runs experts 0 and 1. Evaluations
and benchmarks need a correct eager block to compare with; this one reuses the HF router (whose
routing is right) and loops over experts with the router's combine weights, as 4.57 did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class NllbMoeEagerReference(nn.Module):
    """Correct eager NLLB-MoE sparse MLP built around an existing block's router and experts."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.router = block.router
        self.experts = block.experts
        self._original = (block,)
        self.moe_token_dropout = getattr(block.experts, "moe_token_dropout", 0.0)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        _, combine, _ = self.router(x, padding_mask)  # [N, E] gates, 0 where not routed or dropped
        out = torch.zeros_like(x)
        for e in range(combine.shape[1]):
            rows = torch.nonzero(combine[:, e]).squeeze(1)
            if rows.numel() == 0:
                continue
            y = self.experts[f"expert_{e}"](x[rows]) * combine[rows, e, None]
            if self.moe_token_dropout > 0:
                y = y * (1 - self.moe_token_dropout)
            out.index_add_(0, rows, y.to(x.dtype))
        return out.view(batch, seq_len, hidden)


def use_nllb_eager_reference(model: nn.Module) -> int:
    """Swap every ``NllbMoeSparseMLP`` of ``model`` for :class:`NllbMoeEagerReference`; returns the count."""
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is NllbMoeSparseMLP
    ]
    for parent, name, child in swaps:
        ref = NllbMoeEagerReference(child)
        ref.train(child.training)
        setattr(parent, name, ref)
    return len(swaps)


def remove_nllb_eager_reference(model: nn.Module) -> int:
    """Undo :func:`use_nllb_eager_reference`."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, NllbMoeEagerReference)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, child._original[0])
    return len(swaps)


@contextmanager
def hf_reference(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as the eager reference to time against, for the duration of the block: NLLB-MoE's sparse
    blocks swapped for :class:`NllbMoeEagerReference` (and back afterwards), any other model as loaded."""
    use_nllb_eager_reference(model)
    try:
        yield model
    finally:
        remove_nllb_eager_reference(model)
