"""AXK2: ``AXK2MoE`` (DeepSeek-V3's block and experts; its own router ``gate``).

Router (``AXK2TopkRouter``): float32 logits (tokens and weight widened), sigmoid scores, the choice on
``scores + e_score_correction_bias``; with ``n_group`` set, only the experts of the ``topk_group`` best
groups (ranked by their two best corrected scores) compete -- the others are set to 0, not minus
infinity, as the reference implementation does; without it (the light checkpoints) all experts
compete. Weights: the chosen uncorrected scores, renormalised (``+ 1e-20``) when ``norm_topk_prob``,
times ``routed_scaling_factor``; float32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing.topk import group_mask

from .deepseek_v2 import DeepseekMoELayer
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.axk2.modeling_axk2"
AXK2TopkRouter = hf_class(MODULE, "AXK2TopkRouter")

if AXK2TopkRouter is not None:

    class OptimizedAXK2Router(AXK2TopkRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.view(-1, self.hidden_dim)
            logits = F.linear(flat.float(), self.weight.float())
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            if self.num_group is not None:
                per_group = self.num_experts // self.num_group
                group_scores = choice.view(-1, self.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
                choice = choice.masked_fill(~group_mask(group_scores, self.topk_group, self.num_experts), 0.0)
            indices = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, indices)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * self.routed_scaling_factor, indices

else:  # pragma: no cover - transformers without the model
    OptimizedAXK2Router = None


class AXK2Patch(FusedMoEPatch):
    model_type = "axk2"
    module_path = MODULE
    block_class_name = "AXK2MoE"
    router_class = OptimizedAXK2Router
    layer_class = DeepseekMoELayer
