"""MiniMax-M2: ``MiniMaxM2SparseMoeBlock`` (sigmoid router ``gate`` with a correction bias kept on the
block, fused SiLU-GLU experts).

Router (``MiniMaxM2TopKRouter``, called with the block's ``e_score_correction_bias``): logits in the
router weight's dtype, float32 sigmoid scores; the choice is the top-k of ``scores + bias``, the
weights the uncorrected scores of the chosen experts renormalised to sum to 1 (float32): DeepSeek's
``greedy`` routing with sigmoid scores (:func:`deepseek_topk`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import deepseek_topk

from .fused import BlockBiasLayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.minimax_m2.modeling_minimax_m2"
MiniMaxM2TopKRouter = hf_class(MODULE, "MiniMaxM2TopKRouter")

if MiniMaxM2TopKRouter is not None:

    class OptimizedMiniMaxM2Router(MiniMaxM2TopKRouter):
        """Same module, routing from :func:`deepseek_topk`; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor, e_score_correction_bias: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat.to(self.weight.dtype), self.weight)
            weights, indices = deepseek_topk(
                logits.float(),
                self.top_k,
                scoring="sigmoid",
                method="greedy",
                correction_bias=e_score_correction_bias,
                normalize=True,
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedMiniMaxM2Router = None


class MiniMaxM2Layer(BlockBiasLayer):
    bias_name = "e_score_correction_bias"


class MiniMaxM2Patch(FusedMoEPatch):
    model_type = "minimax_m2"
    module_path = MODULE
    block_class_name = "MiniMaxM2SparseMoeBlock"
    router_class = OptimizedMiniMaxM2Router
    layer_class = MiniMaxM2Layer
