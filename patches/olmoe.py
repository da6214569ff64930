"""OLMoE: ``OlmoeSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``OlmoeTopKRouter``): softmax in float32, top-k, renormalised when ``norm_topk_prob``,
weights cast back to the logits' dtype. Experts as Mixtral's.
"""

from __future__ import annotations

from .fused import FusedMoEPatch, SoftmaxTopKRouting, hf_class

MODULE = "transformers.models.olmoe.modeling_olmoe"
OlmoeTopKRouter = hf_class(MODULE, "OlmoeTopKRouter")

if OlmoeTopKRouter is not None:

    class OptimizedOlmoeRouter(SoftmaxTopKRouting, OlmoeTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk`."""

else:  # pragma: no cover - transformers without the model
    OptimizedOlmoeRouter = None


class OlmoePatch(FusedMoEPatch):
    model_type = "olmoe"
    module_path = MODULE
    block_class_name = "OlmoeSparseMoeBlock"
    router_class = OptimizedOlmoeRouter
