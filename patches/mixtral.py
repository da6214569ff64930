"""Mixtral: ``MixtralSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``MixtralTopKRouter``): logits in the model dtype, softmax in float32, top-k, renormalised;
the weights stay float32, so bf16 experts multiply them in float32. Experts: ``gate_up_proj``
``[E, 2F, D]`` (gate rows first), ``down_proj`` ``[E, D, F]``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import softmax_topk

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.mixtral.modeling_mixtral"
MixtralTopKRouter = hf_class(MODULE, "MixtralTopKRouter")

if MixtralTopKRouter is not None:

    class OptimizedMixtralRouter(MixtralTopKRouter):
        """Same module, routing from :func:`softmax_topk`; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            weights, indices = softmax_topk(logits, self.top_k, normalize=True)
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedMixtralRouter = None


class MixtralPatch(FusedMoEPatch):
    model_type = "mixtral"
    module_path = MODULE
    block_class_name = "MixtralSparseMoeBlock"
    router_class = OptimizedMixtralRouter
