"""Beam: ``BeamMoE`` (DeepSeek-V3's router without its scaling, fused SiLU-GLU experts, no shared
experts, the routed output scaled).

Router (``BeamTopKRouter``): DeepSeek-V3's float32 group-limited sigmoid routing with a correction
bias, renormalised (``+ 1e-20``) when ``norm_topk_prob``, unscaled; the block multiplies the combined
expert output by ``routed_scaling_factor``. Experts: ``act(gate) * up`` computed in float32 and
rounded once (the kernels accumulate in float32 too).
"""

from __future__ import annotations

from .deepseek_v3 import DeepseekV3Routing
from .fused import FusedMoELayer, FusedMoEPatch, ScaledOutput, hf_class

MODULE = "transformers.models.beam.modeling_beam"
BeamTopKRouter = hf_class(MODULE, "BeamTopKRouter")

if BeamTopKRouter is not None:

    class OptimizedBeamRouter(DeepseekV3Routing, BeamTopKRouter):
        """Same module, DeepSeek-V3's routing with the scaling left to the block."""

        routed_scaling_factor = 1.0

else:  # pragma: no cover - transformers without the model
    OptimizedBeamRouter = None


class BeamLayer(ScaledOutput, FusedMoELayer):
    """The routed experts times the block's ``routed_scaling_factor``."""


class BeamPatch(FusedMoEPatch):
    model_type = "beam"
    module_path = MODULE
    block_class_name = "BeamMoE"
    router_class = OptimizedBeamRouter
    layer_class = BeamLayer
