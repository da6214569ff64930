"""What every router returns, and the float32 router projection the families share."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..grad_mode import records_grad


class Routing(NamedTuple):
    """Routing decisions for ``N`` tokens choosing ``k`` experts each.

    ``expert_index`` ``[N, k]`` int64, ``gates`` ``[N, k]`` combine weights (in the dtype the family
    multiplies expert outputs with), ``keep`` ``[N, k]`` bool (False: dropped by capacity, padding or
    a random second-expert policy; a dropped assignment contributes nothing). ``keep`` is None when the
    router dropped nothing, which lets dispatch skip the masking work.
    """

    expert_index: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor | None

    def keep_mask(self) -> torch.Tensor:
        """``keep`` as a tensor (all True when None)."""
        if self.keep is None:
            return torch.ones_like(self.expert_index, dtype=torch.bool)
        return self.keep


_CAST = "_hf_moe_opt_router_cast"


def router_logits(hidden_states: torch.Tensor, classifier: nn.Linear, router_dtype: torch.dtype) -> torch.Tensor:
    """``classifier(hidden_states)`` computed in ``router_dtype`` (float32: "selective precision").

    Unlike HF's routers this does not cast the classifier module in place, so the model's parameters
    keep their dtype. Without gradients the cast copy is kept beside the module and brought up to date
    when the weight changes (see :func:`refresh_router_cast`), so a decode step does not pay a cast
    kernel per layer; with gradients on the cast is part of the graph, so the router's weight gets its
    gradient.
    """
    weight, bias = classifier.weight, classifier.bias
    if weight.dtype == router_dtype and (bias is None or bias.dtype == router_dtype):
        return nn.functional.linear(hidden_states.to(router_dtype), weight, bias)
    cast = None if records_grad(weight, bias) else _cached_cast(classifier, router_dtype)
    if cast is None:
        cast = (weight.to(router_dtype), None if bias is None else bias.to(router_dtype))
    return nn.functional.linear(hidden_states.to(router_dtype), *cast)


def refresh_router_cast(classifier: nn.Module, force: bool = False) -> None:
    """Bring ``classifier``'s kept cast copy (if any) up to date with its weight, in place where the
    shapes allow: a CUDA graph captured on the copy then replays with the new values. Graph runners
    call this before a replay, which runs no Python of the router. ``force``: cast again even where
    the weight's version counter did not move (a write through ``.data`` does not count)."""
    cached = classifier.__dict__.get(_CAST)
    if cached is not None:
        _cached_cast(classifier, cached[0][-1], force=force)


def _cached_cast(classifier: nn.Module, router_dtype: torch.dtype, force: bool = False) -> tuple | None:
    """The kept ``(weight, bias)`` cast to ``router_dtype``; None for inference tensors, which have no
    version counter to tell an in-place write by."""
    weight, bias = classifier.weight, classifier.bias
    if weight.is_inference() or (bias is not None and bias.is_inference()):
        return None
    key = (weight.data_ptr(), weight._version, weight.device)
    if bias is not None:
        key += (bias.data_ptr(), bias._version)
    key += (router_dtype,)
    cached = classifier.__dict__.get(_CAST)
    if cached is not None and cached[0] == key and not force:
        return cached[1]
    # Normal tensors even under inference_mode: a later call with autograd on may save them.
    with torch.no_grad(), torch.inference_mode(False):
        fresh = (weight.to(router_dtype), None if bias is None else bias.to(router_dtype))
        old = None if cached is None else cached[1]
        if old is not None and all(_same_layout(a, b) for a, b in zip(old, fresh, strict=True)):
            for dst, src in zip(old, fresh, strict=True):
                if dst is not None:
                    dst.copy_(src)
            fresh = old  # the memory graphs were captured on
    classifier.__dict__[_CAST] = (key, fresh)
    return fresh


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
