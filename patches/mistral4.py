"""Mistral 4 and Mistral Large 3 (``mistral_large4``): DeepSeek's block (``Mistral4MoE``,
``MistralLarge4TextMoE``: fused SiLU-GLU experts, shared experts) with a softmax group-limited router.

Router (``Mistral4TopkRouter``): softmax scores; groups ranked by the sum of their two best scores,
the experts outside the ``topk_group`` best groups get score 0, top-k of those scores; the weights
are the chosen scores, renormalised (``+ 1e-20``) when ``norm_topk_prob``, times
``routed_scaling_factor``. Mistral 4 computes logits and softmax in the model dtype; Mistral Large
3's router (``MistralLarge4TextTopkRouter``) in float32, and it always renormalises.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing.topk import group_mask

from .deepseek_v2 import DeepseekMoELayer
from .fused import FusedMoEPatch, hf_class


class MistralGroupRouting:
    """Forward for the Mistral 4 routers (mixed in before the HF class): ``(logits, weights, indices)``."""

    float32_logits = False
    normalize_always = False

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.view(-1, self.hidden_dim)
        logits = F.linear(x.float(), self.weight.float()) if self.float32_logits else F.linear(x, self.weight)
        scores = logits.softmax(-1)
        groups = scores.view(-1, self.num_group, self.num_experts // self.num_group)
        keep = group_mask(groups.topk(2, dim=-1)[0].sum(dim=-1), self.topk_group, self.num_experts)
        indices = torch.topk(scores.masked_fill(~keep, 0.0), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.normalize_always or self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, indices


MODULE = "transformers.models.mistral4.modeling_mistral4"
LARGE_MODULE = "transformers.models.mistral_large4.modeling_mistral_large4"
Mistral4TopkRouter = hf_class(MODULE, "Mistral4TopkRouter")
MistralLarge4TextTopkRouter = hf_class(LARGE_MODULE, "MistralLarge4TextTopkRouter")

if Mistral4TopkRouter is not None:

    class OptimizedMistral4Router(MistralGroupRouting, Mistral4TopkRouter):
        """Same module and routing."""

else:  # pragma: no cover - transformers without the model
    OptimizedMistral4Router = None

if MistralLarge4TextTopkRouter is not None:

    class OptimizedMistralLarge4Router(MistralGroupRouting, MistralLarge4TextTopkRouter):
        """Same module and routing, in float32, always renormalised."""

        float32_logits = True
        normalize_always = True

else:  # pragma: no cover - transformers without the model
    OptimizedMistralLarge4Router = None


class Mistral4Patch(FusedMoEPatch):
    model_type = "mistral4"
    module_path = MODULE
    block_class_name = "Mistral4MoE"
    router_class = OptimizedMistral4Router
    layer_class = DeepseekMoELayer


class MistralLarge4Patch(FusedMoEPatch):
    model_type = "mistral_large4"
    module_path = LARGE_MODULE
    block_class_name = "MistralLarge4TextMoE"
    router_class = OptimizedMistralLarge4Router
    layer_class = DeepseekMoELayer
