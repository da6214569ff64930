"""OLMoE: ``OlmoeSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``OlmoeTopKRouter``): softmax in float32, top-k, renormalised when ``norm_topk_prob``,
weights cast back to the logits' dtype. Experts as Mixtral's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import softmax_topk

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.olmoe.modeling_olmoe"
OlmoeTopKRouter = hf_class(MODULE, "OlmoeTopKRouter")

if OlmoeTopKRouter is not None:

    class OptimizedOlmoeRouter(OlmoeTopKRouter):
        """Same module, routing from :func:`softmax_topk`; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            weights, indices = softmax_topk(
                logits, self.top_k, normalize=self.norm_topk_prob, weights_dtype=logits.dtype
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedOlmoeRouter = None


class OlmoePatch(FusedMoEPatch):
    model_type = "olmoe"
    module_path = MODULE
    block_class_name = "OlmoeSparseMoeBlock"
    router_class = OptimizedOlmoeRouter
