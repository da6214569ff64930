"""LFM2-MoE: ``Lfm2MoeSparseMoeBlock`` (sigmoid router ``gate``, an optional expert bias kept on the
block, fused SiLU-GLU experts).

Router (``Lfm2MoeTopKRouter``, called with the block's ``expert_bias`` when ``use_expert_bias``):
logits and sigmoid scores in the model dtype; the choice is the top-k of ``scores + bias`` (or of the
scores), the weights the chosen scores, renormalised when ``norm_topk_prob`` (``+ 1e-6``), times
``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import BlockBiasLayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.lfm2_moe.modeling_lfm2_moe"
Lfm2MoeTopKRouter = hf_class(MODULE, "Lfm2MoeTopKRouter")

if Lfm2MoeTopKRouter is not None:

    class OptimizedLfm2MoeRouter(Lfm2MoeTopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor, expert_bias: torch.Tensor | None = None):
            logits = F.linear(hidden_states, self.weight)
            scores = logits.sigmoid()
            if self.use_expert_bias:
                indices = torch.topk(scores + expert_bias, k=self.top_k, dim=-1).indices
                weights = scores.gather(1, indices).type_as(logits)
            else:
                weights, indices = torch.topk(scores, k=self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
            return logits, weights * self.routed_scaling_factor, indices

else:  # pragma: no cover - transformers without the model
    OptimizedLfm2MoeRouter = None


class Lfm2MoeLayer(BlockBiasLayer):
    bias_name = "expert_bias"


class Lfm2MoePatch(FusedMoEPatch):
    model_type = "lfm2_moe"
    module_path = MODULE
    block_class_name = "Lfm2MoeSparseMoeBlock"
    router_class = OptimizedLfm2MoeRouter
    layer_class = Lfm2MoeLayer
