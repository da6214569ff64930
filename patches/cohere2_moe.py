"""Cohere2-MoE: ``Cohere2MoeSparseMoeBlock`` (top-k router ``gate``, fused SiLU-GLU experts, optional
shared experts summed or averaged with the routed output).

Router (``Cohere2MoeTopKRouter``): ``logits = x W^T`` in the model dtype, top-k of the logits; the
weights are, by ``expert_selection_fn``, the float32 softmax over those k, or their sigmoid
(renormalised when ``norm_topk_prob``), cast to the tokens' dtype. The block adds the shared
experts' output (``shared_expert_combination_strategy="sum"``) or averages the two (``"average"``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.cohere2_moe.modeling_cohere2_moe"
Cohere2MoeTopKRouter = hf_class(MODULE, "Cohere2MoeTopKRouter")

if Cohere2MoeTopKRouter is not None:

    class OptimizedCohere2MoeRouter(Cohere2MoeTopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight)
            top, indices = torch.topk(logits, self.top_k, dim=-1)
            if self.expert_selection_fn == "softmax":
                weights = torch.softmax(top.float(), dim=-1)
            elif self.expert_selection_fn == "sigmoid":
                weights = torch.sigmoid(top)
                if self.norm_topk_prob:
                    weights = weights / weights.sum(dim=-1, keepdim=True)
            else:
                raise ValueError("`expert_selection_fn` can only be `softmax` or `sigmoid`")
            return logits, weights.to(hidden_states.dtype), indices

else:  # pragma: no cover - transformers without the model
    OptimizedCohere2MoeRouter = None


class Cohere2MoeLayer(FusedMoELayer):
    """Routed experts combined with the optional shared experts as the block's strategy says."""

    def __init__(self, block, *args, **kwargs):
        super().__init__(block, *args, **kwargs)
        self.num_shared_experts = block.num_shared_experts
        self.shared_expert_combination_strategy = block.shared_expert_combination_strategy

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        if self.num_shared_experts <= 0:
            return routed
        shared = self.shared_experts(hidden_states)
        if self.shared_expert_combination_strategy == "sum":
            return routed + shared
        if self.shared_expert_combination_strategy == "average":
            return (routed + shared) / 2
        raise ValueError("`shared_expert_combination_strategy` can only be `sum` or `average`")


class Cohere2MoePatch(FusedMoEPatch):
    model_type = "cohere2_moe"
    module_path = MODULE
    block_class_name = "Cohere2MoeSparseMoeBlock"
    router_class = OptimizedCohere2MoeRouter
    layer_class = Cohere2MoeLayer
