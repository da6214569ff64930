"""Expert weights stacked into one storage whose slices *are* the model's parameters.

Grouped GEMMs want all experts of a layer in one ``[E, out, in]`` tensor; the checkpoint wants
``experts.expert_{j}.<name>.weight`` parameters. We keep both without doubling memory: the
parameters are re-pointed (``param.data = stack[j]``) at slices of one stacked tensor, so
``state_dict`` names and values are unchanged and there is one copy of every weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class ExpertStack:
    """One ``[E, *shape]`` tensor whose ``j``-th slice backs parameter ``j``."""

    def __init__(self, params: Sequence[nn.Parameter], what: str):
        if not params:
            raise ValueError(f"no expert parameters given for {what}")
        self.params = list(params)
        self.what = what
        self.tensor = self._stack()

    def _check(self) -> None:
        first = self.params[0]
        for j, p in enumerate(self.params):
            if p.device.type == "meta":
                raise ValueError(
                    f"{self.what}: expert {j} has its weights on the meta device. Load the model with real "
                    "weights (no init_empty_weights, no disk/CPU offload device_map) before hf_moe_opt.optimize."
                )
            if p.shape != first.shape or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"{self.what}: experts differ in shape, dtype or device (expert 0: {tuple(first.shape)} "
                    f"{first.dtype} {first.device}; expert {j}: {tuple(p.shape)} {p.dtype} {p.device}). "
                    "Put all experts of a layer on one device and dtype before optimizing."
                )

    @torch.no_grad()
    def _stack(self) -> torch.Tensor:
        self._check()
        if self.is_current_for(getattr(self, "tensor", None)):
            return self.tensor
        first = self.params[0]
        stacked = torch.empty((len(self.params), *first.shape), dtype=first.dtype, device=first.device)
        for j, p in enumerate(self.params):
            stacked[j].copy_(p.data)
            # Re-point the parameter at its slice; the old storage is freed right here, so the peak is
            # one layer's weights, not the model's.
            p.data = stacked[j]
        return stacked

    def is_current_for(self, tensor: torch.Tensor | None) -> bool:
        if tensor is None:
            return False
        last = len(self.params) - 1
        return (
            self.params[0].data_ptr() == tensor[0].data_ptr()
            and self.params[last].data_ptr() == tensor[last].data_ptr()
            and self.params[0].dtype == tensor.dtype
        )

    def is_current(self) -> bool:
        """Cheap host-side check that the parameters still live in the stack (``.to()`` replaces them)."""
        return self.is_current_for(self.tensor)

    def restack(self) -> torch.Tensor:
        self.tensor = self._stack()
        return self.tensor


@dataclass
class ExpertWeights:
    """The stacked weights of one MoE layer of two-matrix experts ``y = W2 act(W1 x + b1) + b2``.

    ``w1``: ``[E, F, D]``; ``w2``: ``[E, D, F]`` (``nn.Linear`` layout: out x in). Biases optional.
    """

    w1: ExpertStack
    w2: ExpertStack
    b1: ExpertStack | None = None
    b2: ExpertStack | None = None

    def stacks(self) -> list[ExpertStack]:
        return [s for s in (self.w1, self.w2, self.b1, self.b2) if s is not None]

    def refresh(self) -> None:
        """Re-stack after the parameters were moved or cast (``model.to(...)``)."""
        for s in self.stacks():
            if not s.is_current():
                s.restack()

    @property
    def num_experts(self) -> int:
        return self.w1.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.w1.tensor.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return (
            self.w1.tensor,
            None if self.b1 is None else self.b1.tensor,
            self.w2.tensor,
            None if self.b2 is None else self.b2.tensor,
        )
