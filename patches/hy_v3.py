"""HY-V3: ``HYV3MoE`` (float32 sigmoid router ``gate`` called with a correction bias the block holds,
fused SiLU-GLU experts, shared experts, an optional float32 combine).

Router (``HYV3TopKRouter``, called with the block's ``e_score_correction_bias``): float32 logits
(tokens and weight widened), sigmoid scores, the choice is the top-k of ``scores + bias``, the
weights the chosen scores, renormalised (``+ 1e-20``), times ``router_scaling_factor``; float32
weights. The block adds the shared experts' output, in float32 then rounded once when
``enable_moe_fp32_combine``, else in the model dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import BlockBiasLayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.hy_v3.modeling_hy_v3"
HYV3TopKRouter = hf_class(MODULE, "HYV3TopKRouter")

if HYV3TopKRouter is not None:

    class OptimizedHYV3Router(HYV3TopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor, e_score_correction_bias: torch.Tensor):
            x = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(x.float(), self.weight.float())
            scores = torch.sigmoid(logits)
            indices = torch.topk(scores + e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * self.router_scaling_factor, indices

else:  # pragma: no cover - transformers without the model
    OptimizedHYV3Router = None


class HYV3Layer(BlockBiasLayer):
    """Routed experts (with the block's correction bias) plus the shared experts."""

    bias_name = "e_score_correction_bias"

    def __init__(self, block, *args, **kwargs):
        super().__init__(block, *args, **kwargs)
        self.enable_moe_fp32_combine = block.enable_moe_fp32_combine

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(hidden_states)
        if self.enable_moe_fp32_combine:
            return (routed.float() + shared.float()).to(routed.dtype)
        return routed + shared


class HYV3Patch(FusedMoEPatch):
    model_type = "hy_v3"
    module_path = MODULE
    block_class_name = "HYV3MoE"
    router_class = OptimizedHYV3Router
    layer_class = HYV3Layer
