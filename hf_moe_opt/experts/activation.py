"""The expert activation: a name kernels can specialise on, and the exact callable HF uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Names the fused kernels implement natively; other activations run through ``fn``.
KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def kernel_supported(self) -> bool:
        return self.name in KERNEL_ACTIVATIONS
