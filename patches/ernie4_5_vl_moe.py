"""ERNIE 4.5 VL MoE: each decoder layer's ``Ernie4_5_VLMoeMoeBlock`` holds two sparse blocks,
``text_moe`` and ``vision_moe`` (``Ernie4_5_VLMoeSparseMoeBlock``: a router ``gate`` and fused SiLU-GLU
experts of their own width), and the shared experts; it sends each modality's tokens to its block.

The outer block stays transformers' (it picks the tokens of each modality and adds the shared experts);
the two sparse blocks are replaced. Each takes its modality's tokens (flattened by the boolean
selection, or ``[B, S, D]`` when every token is text) and returns ``(hidden.flatten(),
router_logits.flatten())``, and so does the layer. Router (``Ernie4_5_VLMoeMoeTopKRouter``): ERNIE
4.5 MoE's code (:class:`~hf_moe_opt.patches.ernie4_5_moe.Ernie4_5Routing`).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, topk_routing

from .ernie4_5_moe import Ernie4_5Routing
from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe"
Ernie4_5_VLMoeMoeTopKRouter = hf_class(MODULE, "Ernie4_5_VLMoeMoeTopKRouter")

if Ernie4_5_VLMoeMoeTopKRouter is not None:

    class OptimizedErnie4_5_VLMoeRouter(Ernie4_5Routing, Ernie4_5_VLMoeMoeTopKRouter):  # noqa: N801 - HF's name
        """Same module, ERNIE 4.5 MoE's routing (the same code)."""

else:  # pragma: no cover - transformers without the model
    OptimizedErnie4_5_VLMoeRouter = None


class Ernie4_5_VLMoeLayer(FusedMoELayer):  # noqa: N801 - the HF class's name
    """One modality's experts; returns ``(hidden, router_logits)``, both flattened, as the HF block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_logits: torch.Tensor | None = None
        self._family_route = self.route = self._route_keeping_logits

    def _route_keeping_logits(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        logits, weights, indices = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
        self._last_logits = logits
        return topk_routing(weights, indices)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = hidden_states.reshape(-1, self.weights.w1.tensor.shape[-1])
        try:
            routed = OptimizedMoE.forward(self, tokens)
            logits = self._last_logits
        finally:
            self._last_logits = None
        return routed.flatten(), logits.flatten()


class Ernie4_5_VLMoePatch(FusedMoEPatch):  # noqa: N801 - the HF class's name
    model_type = "ernie4_5_vl_moe"
    module_path = MODULE
    block_class_name = "Ernie4_5_VLMoeSparseMoeBlock"
    router_class = OptimizedErnie4_5_VLMoeRouter
    layer_class = Ernie4_5_VLMoeLayer
