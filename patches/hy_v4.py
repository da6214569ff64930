"""HY-V4: ``HYV4MoE`` (DeepSeek-V3's block and router under other names, shared experts) with
limited-SwiGLU experts.

Router: DeepSeek-V3's (float32 group-limited sigmoid routing with a correction bias;
:class:`~hf_moe_opt.patches.deepseek_v3.DeepseekV3Routing`). Experts (``HYV4Experts``):
``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]`` with ``silu(min(gate, limit)) * clamp(up,
-limit, limit)`` on the concatenated halves, ``limit = swiglu_limit``. GLM-5-Next's and HY-V4-VL's
blocks copy this one (:mod:`hf_moe_opt.patches.derived`).
"""

from __future__ import annotations

from torch import nn

from hf_moe_opt.experts.activation import Activation, limited_swiglu_activation

from .deepseek_v2 import DeepseekMoELayer
from .deepseek_v3 import DeepseekV3Routing
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.hy_v4.modeling_hy_v4"
HYV4TopkRouter = hf_class(MODULE, "HYV4TopkRouter")

if HYV4TopkRouter is not None:

    class OptimizedHYV4Router(DeepseekV3Routing, HYV4TopkRouter):
        """Same module, DeepSeek-V3's routing (the same code under other names)."""

else:  # pragma: no cover - transformers without the model
    OptimizedHYV4Router = None


class HYV4Patch(FusedMoEPatch):
    model_type = "hy_v4"
    module_path = MODULE
    block_class_name = "HYV4MoE"
    router_class = OptimizedHYV4Router
    layer_class = DeepseekMoELayer

    def activation(self, block: nn.Module, config) -> Activation:
        return limited_swiglu_activation(block.experts.swiglu_limit)
