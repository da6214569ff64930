"""GPT-OSS: ``GptOssMLP`` (biased router ``router``: top-k then softmax; biased, transposed experts with
a clamped SwiGLU on interleaved gate/up columns).

Router (``GptOssTopKRouter``): ``logits = x W^T + b`` in the model dtype, top-k of the logits,
softmax over those k in the same dtype. Experts: ``gate_up_proj`` ``[E, D, 2F]`` (``x @ W``; gate =
even columns, up = odd), ``gate_up_proj_bias`` ``[E, 2F]``, ``down_proj`` ``[E, F, D]``,
``down_proj_bias`` ``[E, D]``; ``h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)`` with
``g = min(gate, limit)``. ``alpha``/``limit`` are read from the experts module (transformers 5.17
hard-codes 1.702 / 7.0 there, later versions take ``config.swiglu_alpha`` / ``swiglu_limit``). The
block returns ``(hidden, router_scores)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, clamped_swiglu_activation
from hf_moe_opt.routing import topk_softmax

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.gpt_oss.modeling_gpt_oss"
GptOssTopKRouter = hf_class(MODULE, "GptOssTopKRouter")

if GptOssTopKRouter is not None:

    class OptimizedGptOssRouter(GptOssTopKRouter):
        """Same module, routing from :func:`topk_softmax`; returns ``(logits, scores, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight, self.bias)
            weights, indices = topk_softmax(logits, self.top_k)
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedGptOssRouter = None


class GptOssPatch(FusedMoEPatch):
    model_type = "gpt_oss"
    module_path = MODULE
    block_class_name = "GptOssMLP"
    router_name = "router"
    router_class = OptimizedGptOssRouter
    transposed = True
    returns_router_scores = True

    def activation(self, block: nn.Module, config) -> Activation:
        experts = block.experts
        alpha = getattr(experts, "alpha", getattr(config, "swiglu_alpha", 1.702))
        limit = getattr(experts, "limit", getattr(config, "swiglu_limit", 7.0))
        return clamped_swiglu_activation(alpha, limit)
