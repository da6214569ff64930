"""Expert stores: where a layer's expert weights live and how they reach the compute.

The optimized layer asks its store to run the experts over a dispatch plan. The default keeps every
expert resident on the layer's device; expert buffering (a GPU cache over pinned host memory) and
multi-device placement are other stores behind the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..dispatch import DispatchPlan
from .activation import Activation
from .weights import ExpertWeights

# ffn_for(device, rows) -> moe_ffn(x, plan, w1, b1, w2, b2, activation, out_scale) for that call.
FfnFactory = Callable[[torch.device, int], Callable]


class ExpertStore(ABC):
    """Runs a layer's experts; subclasses decide where the weights are."""

    #: Whether :meth:`run` can be captured in a CUDA graph (no host read of the routing). The layer
    #: refuses to run an uncapturable store inside a capture (continuous batching, step graphs).
    capturable: bool = False

    def __init__(self, weights: ExpertWeights):
        self.weights = weights

    @abstractmethod
    def run(
        self, x: torch.Tensor, plan: DispatchPlan, ffn_for: FfnFactory, activation: Activation, out_scale: float
    ) -> torch.Tensor:
        """``[N, D]`` combined expert output for ``x`` routed by ``plan``."""

    def refresh(self) -> None:
        """Called after the module was moved or cast (``model.to(...)``)."""
        self.weights.refresh()

    def stats(self) -> dict:
        """Store-specific counters (hits, copies, ...); empty for resident experts."""
        return {}


class ResidentStore(ExpertStore):
    """Every expert of the layer stacked on one device."""

    capturable = True

    def run(self, x, plan, ffn_for, activation, out_scale):
        w1, b1, w2, b2 = self._tensors()
        return ffn_for(x.device, plan.num_rows)(x, plan, w1, b1, w2, b2, activation, out_scale)

    def run_direct(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        gates: torch.Tensor,
        keep: torch.Tensor | None,
        backend: str,
        activation: Activation,
        out_scale: float,
    ) -> torch.Tensor | None:
        """The experts of a decode step straight from the router's choices, without a dispatch plan
        (``backend``: the concrete backend name); None where that path does not apply."""
        from .backends import direct_ffn

        ffn = direct_ffn(backend, expert_index.shape[0])  # cheap checks first: most calls stop here
        if ffn is None:
            return None
        from ..kernels import kernel_supported

        w1, b1, w2, b2 = self._tensors()
        if not kernel_supported(x, w1, w2, activation):
            return None
        return ffn(x, expert_index, gates, keep, w1, b1, w2, b2, activation, out_scale)

    def _tensors(self) -> tuple:
        if not self.weights.w1.is_current():
            self.weights.refresh()
        return self.weights.tensors()
