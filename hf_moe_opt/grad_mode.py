"""Whether autograd records an operation on some tensors: the Triton kernels and the fused planners
have no backward, so each fast path asks this and hands over to torch's ops where it does."""

from __future__ import annotations

import torch


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """True when gradients are enabled and any of ``tensors`` (None entries skipped) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
