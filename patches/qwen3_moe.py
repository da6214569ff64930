"""Qwen3-MoE: ``Qwen3MoeSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``Qwen3MoeTopKRouter``): softmax in float32, top-k, renormalised when ``norm_topk_prob``,
weights cast back to the logits' dtype. Experts as Mixtral's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import softmax_topk

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.qwen3_moe.modeling_qwen3_moe"
Qwen3MoeTopKRouter = hf_class(MODULE, "Qwen3MoeTopKRouter")

if Qwen3MoeTopKRouter is not None:

    class OptimizedQwen3MoeRouter(Qwen3MoeTopKRouter):
        """Same module, routing from :func:`softmax_topk`; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            weights, indices = softmax_topk(
                logits, self.top_k, normalize=self.norm_topk_prob, weights_dtype=logits.dtype
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedQwen3MoeRouter = None


class Qwen3MoePatch(FusedMoEPatch):
    model_type = "qwen3_moe"
    module_path = MODULE
    block_class_name = "Qwen3MoeSparseMoeBlock"
    router_class = OptimizedQwen3MoeRouter
