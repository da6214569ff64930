"""ZAYA1: ``ZayaSparseMoeBlock`` (an MLP router with state carried from layer to layer and a "skip"
class, fused SiLU-GLU experts, top-1).

Router (``ZayaRouter``, transformers' forward kept): ``down_proj`` to ``router_hidden_size``, plus the
previous layer's router state times ``router_states_scale`` (every layer but the first), then an MLP
(RMSNorm, two GELU linears) to ``num_experts + 1`` logits and a softmax; the choice is the top-k of the
probabilities (float32) plus ``balancing_biases`` (``-1`` on the skip class at initialisation), the
weights the chosen probabilities. A token sent to the skip class gets weight 0 on expert 0 from the
router: transformers then runs expert 0 for it and adds nothing; we drop that assignment from the
dispatch (``keep`` False), which adds the same nothing. The block takes the previous router state
beside the hidden states and returns ``(hidden, router state for the next layer)``; so does the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.zaya.modeling_zaya"
ZayaRouter = hf_class(MODULE, "ZayaRouter")

if ZayaRouter is not None:

    class OptimizedZayaRouter(ZayaRouter):
        """Same module and routing (transformers' forward: the MLP router is ordinary module code)."""

else:  # pragma: no cover - transformers without the model
    OptimizedZayaRouter = None


class ZayaMoELayer(FusedMoELayer):
    """Routed experts over the router's choice, skipped tokens left out; passes the router state on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._router_states: torch.Tensor | None = None
        self._next_states: torch.Tensor | None = None
        self._family_route = self.route = self._route_with_state

    def _route_with_state(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        _, weights, indices, self._next_states = router(hidden_states, router_states=self._router_states)
        # The router's skip class arrives as expert 0 with weight 0.
        return Routing(indices, weights, (indices != 0) | (weights != 0))

    def forward(
        self, hidden_states: torch.Tensor, prev_router_hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._router_states = prev_router_hidden_states
        try:
            out = OptimizedMoE.forward(self, hidden_states)
            return out, self._next_states
        finally:
            self._router_states = self._next_states = None


class ZayaPatch(FusedMoEPatch):
    model_type = "zaya"
    module_path = MODULE
    block_class_name = "ZayaSparseMoeBlock"
    router_class = OptimizedZayaRouter
    layer_class = ZayaMoELayer
