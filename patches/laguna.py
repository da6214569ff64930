"""Laguna: ``LagunaSparseMoeBlock`` (sigmoid router ``gate`` with a correction bias and optional logit
softcapping, fused SiLU-GLU experts, shared experts, scaled routed output).

Router (``LagunaTopKRouter``): logits in the model dtype, then float32; with
``router_logit_softcapping > 0``, ``tanh(logits / cap) * cap``; sigmoid scores; the choice is the
top-k of ``scores + e_score_correction_bias``, the weights the uncorrected scores of the chosen
experts renormalised (no epsilon), cast to the tokens' dtype. The block multiplies the combined
routed output by ``routed_scaling_factor`` and adds ``shared_experts(x)``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import deepseek_topk

from .deepseek_v2 import ScaledDeepseekMoELayer
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.laguna.modeling_laguna"
LagunaTopKRouter = hf_class(MODULE, "LagunaTopKRouter")

if LagunaTopKRouter is not None:

    class OptimizedLagunaRouter(LagunaTopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat, self.weight).float()
            cap = self.router_logit_softcapping
            if cap > 0.0:
                logits = torch.tanh(logits / cap) * cap
            weights, indices = deepseek_topk(
                logits,
                self.top_k,
                scoring="sigmoid",
                method="greedy",
                correction_bias=self.e_score_correction_bias.float(),
                normalize=True,
            )
            return logits, weights.to(flat.dtype), indices

else:  # pragma: no cover - transformers without the model
    OptimizedLagunaRouter = None


class LagunaPatch(FusedMoEPatch):
    model_type = "laguna"
    module_path = MODULE
    block_class_name = "LagunaSparseMoeBlock"
    router_class = OptimizedLagunaRouter
    layer_class = ScaledDeepseekMoELayer
