"""Eager baselines to compare against where the installed transformers runs a block wrongly.

* NLLB-MoE: transformers 5.0-5.25 ship an expert loop that only ever runs experts 0 and 1.
  :class:`NllbMoeEagerReference` reuses the HF router (whose routing is right) and loops over experts
  with the router's combine weights, as 4.57 did.
* Switch Transformers: transformers 5.0-5.17 never apply expert capacity (the router's cumsum runs over
  a size-1 dimension). :class:`SwitchEagerReference` routes as 4.57 and >= 5.23 do, capacity counted
  per sequence, and runs the block's own experts.
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


class SwitchEagerReference(nn.Module):
    """Switch Transformers sparse MLP with expert capacity counted per sequence, around an existing
    block's router and experts (inference: no router jitter). The router's arithmetic is the HF
    router's (float32 logits and softmax, top-1, probabilities back in the input dtype); tokens past an
    expert's capacity within their sequence get a zero output, as in transformers 4.57 and >= 5.23."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.router = block.router
        self.experts = block.experts
        self._original = (block,)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        router = self.router
        weight = router.classifier.weight.to(router.dtype)
        bias = router.classifier.bias.to(router.dtype) if router.classifier.bias is not None else None
        logits = nn.functional.linear(hidden_states.to(router.dtype), weight, bias)
        probs = nn.functional.softmax(logits, dim=-1, dtype=router.dtype).to(hidden_states.dtype)
        chosen = nn.functional.one_hot(probs.argmax(dim=-1), num_classes=router.num_experts)  # [B, S, E]
        chosen = chosen * (chosen.cumsum(dim=-2) <= router.expert_capacity)  # capacity per sequence
        gates = probs.max(dim=-1).values
        out = self.experts(
            hidden_states.reshape(-1, hidden), chosen.reshape(-1, 1, router.num_experts), gates.reshape(-1, 1)
        )
        return out.reshape(batch, seq_len, hidden)


def _swap_in(model: nn.Module, block_class: type, reference: type) -> int:
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is block_class
    ]
    for parent, name, child in swaps:
        ref = reference(child)
        ref.train(child.training)
        setattr(parent, name, ref)
    return len(swaps)


def _swap_out(model: nn.Module, reference: type) -> int:
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, reference)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, child._original[0])
    return len(swaps)


def use_nllb_eager_reference(model: nn.Module) -> int:
    """Swap every ``NllbMoeSparseMLP`` of ``model`` for :class:`NllbMoeEagerReference`; returns the count."""
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    return _swap_in(model, NllbMoeSparseMLP, NllbMoeEagerReference)


def remove_nllb_eager_reference(model: nn.Module) -> int:
    """Undo :func:`use_nllb_eager_reference`."""
    return _swap_out(model, NllbMoeEagerReference)


def use_switch_eager_reference(model: nn.Module) -> int:
    """Swap every ``SwitchTransformersSparseMLP`` of ``model`` for :class:`SwitchEagerReference`; returns
    the count."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    return _swap_in(model, SwitchTransformersSparseMLP, SwitchEagerReference)


def remove_switch_eager_reference(model: nn.Module) -> int:
    """Undo :func:`use_switch_eager_reference`."""
    return _swap_out(model, SwitchEagerReference)


@contextmanager
def hf_reference(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as the eager reference to time against, for the duration of the block: NLLB-MoE's sparse
    blocks swapped for :class:`NllbMoeEagerReference` (and back afterwards), any other model as loaded."""
    use_nllb_eager_reference(model)
    try:
        yield model
    finally:
        remove_nllb_eager_reference(model)
