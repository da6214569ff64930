"""Qwen2-MoE: ``Qwen2MoeSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts, and a
shared expert scaled by a sigmoid gate).

Router (``Qwen2MoeTopKRouter``) as Qwen3-MoE's. The block adds
``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` to the routed experts' output; the shared
expert is an ordinary module of the layer and always runs (it stays resident under any store).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import FusedMoELayer, FusedMoEPatch, SoftmaxTopKRouting, hf_class

MODULE = "transformers.models.qwen2_moe.modeling_qwen2_moe"
Qwen2MoeTopKRouter = hf_class(MODULE, "Qwen2MoeTopKRouter")

if Qwen2MoeTopKRouter is not None:

    class OptimizedQwen2MoeRouter(SoftmaxTopKRouting, Qwen2MoeTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk`."""

else:  # pragma: no cover - transformers without the model
    OptimizedQwen2MoeRouter = None


class Qwen2MoeLayer(FusedMoELayer):
    """Routed experts plus the sigmoid-gated shared expert."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        shared = F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed.view(-1, routed.shape[-1]) + shared).view(routed.shape)


class Qwen2MoePatch(FusedMoEPatch):
    model_type = "qwen2_moe"
    module_path = MODULE
    block_class_name = "Qwen2MoeSparseMoeBlock"
    router_class = OptimizedQwen2MoeRouter
    layer_class = Qwen2MoeLayer
