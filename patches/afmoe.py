"""AFMoE (Arcee Trinity): ``AfmoeSparseMoeBlock`` (sigmoid router ``router`` with an expert bias the
block holds, fused SiLU-GLU experts, shared experts that always run).

Router (``AfmoeTokenChoiceRouter``, called with the block's ``expert_bias``): logits from its linear
``gate`` in the model dtype, widened to float32; sigmoid scores; the choice is the top-k of
``scores + expert_bias``, the weights the chosen scores, renormalised (``+ 1e-20``), times
``route_scale``; float32 weights. The block adds ``shared_experts(x)``.
"""

from __future__ import annotations

import torch

from .fused import BlockBiasLayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.afmoe.modeling_afmoe"
AfmoeTokenChoiceRouter = hf_class(MODULE, "AfmoeTokenChoiceRouter")

if AfmoeTokenChoiceRouter is not None:

    class OptimizedAfmoeRouter(AfmoeTokenChoiceRouter):
        """Same module and routing (any token shape); returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor, expert_bias: torch.Tensor):
            logits = self.gate(hidden_states.reshape(-1, hidden_states.shape[-1])).to(torch.float32)
            scores = torch.sigmoid(logits)
            indices = torch.topk(scores + expert_bias, k=self.top_k, dim=1).indices
            weights = scores.gather(dim=1, index=indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * self.route_scale, indices

else:  # pragma: no cover - transformers without the model
    OptimizedAfmoeRouter = None


class AfmoeLayer(BlockBiasLayer):
    """Routed experts (routed with the block's ``expert_bias``) plus the shared experts."""

    bias_name = "expert_bias"

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(hidden_states) + routed


class AfmoePatch(FusedMoEPatch):
    model_type = "afmoe"
    module_path = MODULE
    block_class_name = "AfmoeSparseMoeBlock"
    router_name = "router"
    router_class = OptimizedAfmoeRouter
    layer_class = AfmoeLayer
