"""MiniMax-M3 (``minimax_m3_vl``'s language model): ``MiniMaxM3VLSparseMoeBlock`` -- Step-3.7's block and
router under other names (sigmoid scores, correction bias for the choice, renormalised; the routed
output scaled by ``routed_scaling_factor``; shared experts), with GPT-OSS's clamped SwiGLU on the
concatenated gate/up halves: ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
``(u + 1) * g * sigmoid(alpha * g)``.
"""

from __future__ import annotations

from torch import nn

from hf_moe_opt.experts.activation import Activation, clamped_swiglu_activation

from .deepseek_v2 import ScaledDeepseekMoELayer
from .fused import FusedMoEPatch, hf_class
from .step3p7 import Step3p7Routing

MODULE = "transformers.models.minimax_m3_vl.modeling_minimax_m3_vl"
MiniMaxM3VLTopKRouter = hf_class(MODULE, "MiniMaxM3VLTopKRouter")

if MiniMaxM3VLTopKRouter is not None:

    class OptimizedMiniMaxM3VLRouter(Step3p7Routing, MiniMaxM3VLTopKRouter):
        """Same module, Step-3.7's routing (the same code under other names)."""

else:  # pragma: no cover - transformers without the model
    OptimizedMiniMaxM3VLRouter = None


class MiniMaxM3VLPatch(FusedMoEPatch):
    model_type = "minimax_m3_vl"
    module_path = MODULE
    block_class_name = "MiniMaxM3VLSparseMoeBlock"
    router_class = OptimizedMiniMaxM3VLRouter
    layer_class = ScaledDeepseekMoELayer

    def activation(self, block: nn.Module, config) -> Activation:
        experts = block.experts
        return clamped_swiglu_activation(experts.swiglu_alpha, experts.swiglu_limit, interleaved=False)
