"""Aria: ``AriaTextMoELayer`` (top-k router ``router``, transposed SiLU-GLU experts, shared experts that
always run).

Router (``AriaTextTopKRouter``): ``logits = x W^T`` in the model dtype, top-k of the logits, softmax over
those k in the same dtype (GPT-OSS's routing, without a bias). Experts: ``gate_up_proj [E, D, 2F]``
(``x @ W``, gate then up) and ``down_proj [E, F, D]``, always SiLU-gated (the shared experts follow
``hidden_act``). Transformers versions whose Aria routes inside its experts (5.17) are not matched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, glu_activation
from hf_moe_opt.routing import topk_softmax

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.aria.modeling_aria"
AriaTextTopKRouter = hf_class(MODULE, "AriaTextTopKRouter")

if AriaTextTopKRouter is not None:

    class OptimizedAriaRouter(AriaTextTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.topk_softmax`; returns ``(logits,
        weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight)
            weights, indices = topk_softmax(logits, self.top_k)
            return logits, weights, indices

else:  # pragma: no cover - transformers without the router class
    OptimizedAriaRouter = None


class AriaLayer(FusedMoELayer):
    """Routed experts plus the shared experts."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return routed + self.shared_experts(hidden_states)


class AriaPatch(FusedMoEPatch):
    model_type = "aria"
    module_path = MODULE
    block_class_name = "AriaTextMoELayer"
    router_name = "router"
    router_class = OptimizedAriaRouter
    transposed = True
    layer_class = AriaLayer

    def matches(self, module: nn.Module) -> bool:
        return OptimizedAriaRouter is not None and super().matches(module)

    def activation(self, block: nn.Module, config) -> Activation:
        """SiLU-GLU whatever ``hidden_act`` says (transformers builds the experts' SiLU itself)."""
        from transformers.activations import ACT2CLS

        act_fn = block.experts.act_fn
        silu = ACT2CLS["silu"]
        silu = silu[0] if isinstance(silu, tuple) else silu
        return glu_activation("silu" if type(act_fn) is silu else type(act_fn).__name__, act_fn)
