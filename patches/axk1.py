"""AXK1 (A.X K1): ``AXK1MoE`` -- DeepSeek-V3's block, router and experts with one addition: the block
normalises its output (routed plus shared experts) with ``post_mlp_layernorm`` (an RMSNorm), which the
layer applies after the shared experts as transformers does.
"""

from __future__ import annotations

import torch

from .deepseek_v2 import DeepseekMoELayer
from .deepseek_v3 import DeepseekV3Routing
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.axk1.modeling_axk1"
AXK1TopkRouter = hf_class(MODULE, "AXK1TopkRouter")

if AXK1TopkRouter is not None:

    class OptimizedAXK1Router(DeepseekV3Routing, AXK1TopkRouter):
        """Same module, DeepSeek-V3's routing (the same code under other names)."""

else:  # pragma: no cover - transformers without the model
    OptimizedAXK1Router = None


class AXK1Layer(DeepseekMoELayer):
    """DeepSeek-V3's routed and shared experts, then the block's ``post_mlp_layernorm``."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return self.post_mlp_layernorm(super().add_shared(hidden_states, routed))


class AXK1Patch(FusedMoEPatch):
    model_type = "axk1"
    module_path = MODULE
    block_class_name = "AXK1MoE"
    router_class = OptimizedAXK1Router
    layer_class = AXK1Layer
