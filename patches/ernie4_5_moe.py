"""ERNIE 4.5 MoE: ``Ernie4_5_MoeSparseMoeBlock`` (softmax router ``gate`` with a correction bias, fused
SiLU-GLU experts, optional shared experts).

Router (``Ernie4_5_MoeTopKRouter``), in float32 with autocast off: softmax probabilities; the choice is
the top-k of the probabilities plus ``moe_statics.e_score_correction_bias``, the weights the
uncorrected probabilities of the chosen experts divided by their sum (clamped below at
``moe_norm_min``), cast to the tokens' dtype. The block adds ``shared_experts(x)`` when it has them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe"
Ernie4_5_MoeTopKRouter = hf_class(MODULE, "Ernie4_5_MoeTopKRouter")


class Ernie4_5Routing:
    """Forward for ERNIE 4.5 routers (mixed in before the HF class; ERNIE 4.5 VL's is the same code):
    returns ``(logits, weights, indices)``."""

    def forward(self, hidden_states: torch.Tensor):
        with torch.autocast(hidden_states.device.type, enabled=False):
            logits = F.linear(hidden_states.float(), self.weight.float())
            probs = F.softmax(logits, dim=1, dtype=torch.float)
            bias = self.moe_statics.e_score_correction_bias.squeeze()
            indices = torch.topk(probs + bias, self.top_k, dim=-1).indices
            weights = probs.gather(-1, indices)
            weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        return logits, weights.to(hidden_states.dtype), indices


if Ernie4_5_MoeTopKRouter is not None:

    class OptimizedErnie4_5_MoeRouter(Ernie4_5Routing, Ernie4_5_MoeTopKRouter):  # noqa: N801 - the HF class's name
        """Same module and routing; returns ``(logits, weights, indices)``."""

else:  # pragma: no cover - transformers without the model
    OptimizedErnie4_5_MoeRouter = None


class Ernie4_5_MoeLayer(FusedMoELayer):  # noqa: N801 - the HF class's name
    """Routed experts plus the shared experts, where the block has them."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        shared = self._modules.get("shared_experts")  # a block without them holds None outside _modules
        return routed if shared is None else routed + shared(hidden_states)


class Ernie4_5_MoePatch(FusedMoEPatch):  # noqa: N801 - the HF class's name
    model_type = "ernie4_5_moe"
    module_path = MODULE
    block_class_name = "Ernie4_5_MoeSparseMoeBlock"
    router_class = OptimizedErnie4_5_MoeRouter
    layer_class = Ernie4_5_MoeLayer
