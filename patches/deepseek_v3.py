"""DeepSeek-V3: ``DeepseekV3MoE`` (sigmoid scores, ``e_score_correction_bias``, group-limited top-k
router ``gate``, ``norm_topk_prob``, ``routed_scaling_factor``, fused SiLU-GLU experts, shared experts).

Router (``DeepseekV3TopkRouter``): float32 logits, sigmoid scores; the choice uses
``scores + e_score_correction_bias``: groups ranked by the sum of their two best corrected scores,
the ``topk_group`` best kept, top-k of the corrected scores inside them; the weights are the
uncorrected scores of the chosen experts, renormalised (``+ 1e-20``) when ``norm_topk_prob``, times
``routed_scaling_factor`` (float32). The block adds ``shared_experts(x)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import deepseek_topk

from .deepseek_v2 import DeepseekMoELayer
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.deepseek_v3.modeling_deepseek_v3"
DeepseekV3TopkRouter = hf_class(MODULE, "DeepseekV3TopkRouter")


class DeepseekV3Routing:
    """Forward for DeepSeek-V3-style routers (mixed in before the HF class): the routing of
    :func:`deepseek_topk`, returned as ``(logits, weights, indices)``. ``autocast_off``: the logits
    stay float32 under autocast too (routers that turn autocast off around them)."""

    autocast_off: bool = False

    def forward(self, hidden_states: torch.Tensor):
        flat = hidden_states.view(-1, self.hidden_dim)
        with torch.autocast(flat.device.type, enabled=False) if self.autocast_off else contextlib.nullcontext():
            logits = F.linear(flat.type(torch.float32), self.weight.type(torch.float32))
        weights, indices = deepseek_topk(
            logits,
            self.top_k,
            scoring="sigmoid",
            method="noaux_tc",
            n_group=self.num_group,
            topk_group=self.topk_group,
            correction_bias=self.e_score_correction_bias,
            normalize=self.norm_topk_prob,
            scaling=self.routed_scaling_factor,
        )
        return logits, weights, indices


if DeepseekV3TopkRouter is not None:

    class OptimizedDeepseekV3Router(DeepseekV3Routing, DeepseekV3TopkRouter):
        """Same module, routing from :func:`deepseek_topk`."""

else:  # pragma: no cover - transformers without the model
    OptimizedDeepseekV3Router = None


class DeepseekV3Patch(FusedMoEPatch):
    model_type = "deepseek_v3"
    module_path = MODULE
    block_class_name = "DeepseekV3MoE"
    router_class = OptimizedDeepseekV3Router
    layer_class = DeepseekMoELayer
