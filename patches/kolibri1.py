"""Kolibri1: ``Kolibri1SparseMoeBlock`` (DeepSeek-V3's block and experts, shared experts; its own router
``gate``).

Router (``Kolibri1TopKRouter``): float32 logits -- on CUDA, for 16-bit tokens of the weight's dtype
without autograd, a 16-bit GEMM with float32 output (``torch.mm(..., out_dtype=float32)``), else the
float32 GEMM -- then the top-k of ``logits + e_score_correction_bias`` (the bias corrects the logits,
not the scores), weights = sigmoid of the chosen logits, renormalised when ``norm_topk_prob`` (no
epsilon); float32 weights. The same GEMM is taken here, so the logits are bit-equal on either path.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .deepseek_v2 import DeepseekMoELayer
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.kolibri1.modeling_kolibri1"
Kolibri1TopKRouter = hf_class(MODULE, "Kolibri1TopKRouter")


def _mm_out_dtype_available() -> bool:
    from transformers.utils import is_torch_greater_or_equal

    return is_torch_greater_or_equal("2.8.0")


if Kolibri1TopKRouter is not None:

    class OptimizedKolibri1Router(Kolibri1TopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            x = hidden_states.reshape(-1, self.hidden_dim)
            if x.is_cuda and x.dtype == self.weight.dtype and not torch.is_grad_enabled() and _mm_out_dtype_available():
                logits = torch.mm(x, self.weight.t(), out_dtype=torch.float32)
            else:
                logits = F.linear(x.float(), self.weight.float())
            indices = torch.topk(logits + self.e_score_correction_bias, self.top_k, dim=-1)[1]
            weights = logits.gather(1, indices).sigmoid()
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedKolibri1Router = None


class Kolibri1Patch(FusedMoEPatch):
    model_type = "kolibri1"
    module_path = MODULE
    block_class_name = "Kolibri1SparseMoeBlock"
    router_class = OptimizedKolibri1Router
    layer_class = DeepseekMoELayer
