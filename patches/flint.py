"""Flint: ``FlintSparseMoeBlock`` (sigmoid router ``gate``, fused SiLU-GLU experts, an ungated shared
expert).

Router (``FlintTopKRouter``): float32 logits with autocast off, top-k of the sigmoid scores (no
correction bias), renormalised when ``norm_topk_prob``; float32 weights. The block adds
``shared_expert(x)`` in full.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import deepseek_topk

from .fused import FusedMoEPatch, SharedExpertLayer, hf_class

MODULE = "transformers.models.flint.modeling_flint"
FlintTopKRouter = hf_class(MODULE, "FlintTopKRouter")

if FlintTopKRouter is not None:

    class OptimizedFlintRouter(FlintTopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            with torch.autocast(flat.device.type, enabled=False):
                logits = F.linear(flat.float(), self.weight.float())
            weights, indices = deepseek_topk(
                logits, self.top_k, scoring="sigmoid", method="greedy", normalize=bool(self.norm_topk_prob)
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedFlintRouter = None


class FlintPatch(FusedMoEPatch):
    model_type = "flint"
    module_path = MODULE
    block_class_name = "FlintSparseMoeBlock"
    router_class = OptimizedFlintRouter
    layer_class = SharedExpertLayer
