"""MiMo-V2-Flash: ``MiMoV2FlashMoE`` (DeepSeek-V3's router ``gate`` under another name, fused SiLU-GLU
experts, no shared experts).

Router (``MiMoV2FlashTopkRouter``): float32 sigmoid scores, the choice on the scores plus
``e_score_correction_bias`` within the ``topk_group`` best of ``n_group`` groups, weights the chosen
scores, renormalised (``+ 1e-20``) when ``norm_topk_prob``, times ``routed_scaling_factor``; float32
weights (:class:`~hf_moe_opt.patches.deepseek_v3.DeepseekV3Routing`).
"""

from __future__ import annotations

from .deepseek_v3 import DeepseekV3Routing
from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.mimo_v2_flash.modeling_mimo_v2_flash"
MiMoV2FlashTopkRouter = hf_class(MODULE, "MiMoV2FlashTopkRouter")

if MiMoV2FlashTopkRouter is not None:

    class OptimizedMiMoV2FlashRouter(DeepseekV3Routing, MiMoV2FlashTopkRouter):
        """Same module, DeepSeek-V3's routing (the same code under other names)."""

else:  # pragma: no cover - transformers without the model
    OptimizedMiMoV2FlashRouter = None


class MiMoV2FlashPatch(FusedMoEPatch):
    model_type = "mimo_v2_flash"
    module_path = MODULE
    block_class_name = "MiMoV2FlashMoE"
    router_class = OptimizedMiMoV2FlashRouter
