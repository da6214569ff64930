"""Qwen3-MoE: ``Qwen3MoeSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``Qwen3MoeTopKRouter``): softmax in float32, top-k, renormalised when ``norm_topk_prob``,
weights cast back to the logits' dtype. Experts as Mixtral's.
"""

from __future__ import annotations

from .fused import FusedMoEPatch, SoftmaxTopKRouting, hf_class

MODULE = "transformers.models.qwen3_moe.modeling_qwen3_moe"
Qwen3MoeTopKRouter = hf_class(MODULE, "Qwen3MoeTopKRouter")

if Qwen3MoeTopKRouter is not None:

    class OptimizedQwen3MoeRouter(SoftmaxTopKRouting, Qwen3MoeTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk`."""

else:  # pragma: no cover - transformers without the model
    OptimizedQwen3MoeRouter = None


class Qwen3MoePatch(FusedMoEPatch):
    model_type = "qwen3_moe"
    module_path = MODULE
    block_class_name = "Qwen3MoeSparseMoeBlock"
    router_class = OptimizedQwen3MoeRouter
