"""Expert stores: where a layer's expert weights live and how they reach the compute.

The optimized layer hands its store the router's choices (:meth:`ExpertStore.run_routed`); most stores
build the dispatch plan from them and run the experts over it (:meth:`ExpertStore.run`). The default
keeps every expert resident on the layer's device; expert buffering (a GPU cache over pinned host
memory) and multi-device placement are other stores behind the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..dispatch import DispatchPlan, make_plan
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

    def run_routed(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        gates: torch.Tensor,
        keep: torch.Tensor | None,
        backend: str,
        ffn_for: FfnFactory,
        activation: Activation,
        out_scale: float,
    ) -> torch.Tensor:
        """``[N, D]`` combined expert output for ``x`` routed by the router's ``[N, k]`` choices, gates
        and keep mask (None: nothing dropped); ``backend`` is the layer's concrete backend name.
        By default: the dispatch plan, then :meth:`run`."""
        plan = make_plan(expert_index, gates, keep, self.weights.num_experts)
        return self.run(x, plan, ffn_for, activation, out_scale)

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

    def run_routed(self, x, expert_index, gates, keep, backend, ffn_for, activation, out_scale):
        # Decode steps: no dispatch plan (hf_moe_opt.kernels.gemv).
        out = self.run_direct(x, expert_index, gates, keep, backend, activation, out_scale)
        if out is not None:
            return out
        return super().run_routed(x, expert_index, gates, keep, backend, ffn_for, activation, out_scale)

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
        from .backends import supported_direct_ffn

        found = supported_direct_ffn(backend, x, self._tensors, activation)
        if found is None:
            return None
        ffn, (w1, b1, w2, b2) = found
        return ffn(x, expert_index, gates, keep, w1, b1, w2, b2, activation, out_scale)

    def weights_changed(self) -> None:
        """Parameters re-pointed one by one (``p.data = ...``) are stacked again."""
        self.weights.refresh(full=True)

    def _tensors(self) -> tuple:
        if not self.weights.w1.is_current():
            self.weights.refresh()
        return self.weights.tensors()
