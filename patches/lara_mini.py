"""Lara-mini: ``LaraMiniSparseMoeBlock`` (softmax router ``gate``, fused SiLU-GLU experts, an ungated
shared expert).

Router (``LaraMiniTopKRouter``): float32 logits and softmax, top-k, renormalised when
``norm_topk_prob``, weights cast to the tokens' dtype (Qwen2-MoE's routing with float32 logits). The
block adds ``shared_expert(x)`` in full (no sigmoid gate, unlike Qwen2-MoE).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import softmax_topk

from .fused import FusedMoEPatch, SharedExpertLayer, hf_class

MODULE = "transformers.models.lara_mini.modeling_lara_mini"
LaraMiniTopKRouter = hf_class(MODULE, "LaraMiniTopKRouter")

if LaraMiniTopKRouter is not None:

    class OptimizedLaraMiniRouter(LaraMiniTopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat.float(), self.weight.float())
            weights, indices = softmax_topk(
                logits, self.top_k, normalize=bool(self.norm_topk_prob), weights_dtype=flat.dtype
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedLaraMiniRouter = None


class LaraMiniPatch(FusedMoEPatch):
    model_type = "lara_mini"
    module_path = MODULE
    block_class_name = "LaraMiniSparseMoeBlock"
    router_class = OptimizedLaraMiniRouter
    layer_class = SharedExpertLayer
