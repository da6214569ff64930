"""Mixtral: ``MixtralSparseMoeBlock`` (softmax top-k router ``gate``, fused SiLU-GLU experts).

Router (``MixtralTopKRouter``): logits in the model dtype, softmax in float32, top-k, renormalised;
the weights stay float32, so bf16 experts multiply them in float32. Experts: ``gate_up_proj``
``[E, 2F, D]`` (gate rows first), ``down_proj`` ``[E, D, F]``.
"""

from __future__ import annotations

from .fused import FusedMoEPatch, SoftmaxTopKRouting, hf_class

MODULE = "transformers.models.mixtral.modeling_mixtral"
MixtralTopKRouter = hf_class(MODULE, "MixtralTopKRouter")

if MixtralTopKRouter is not None:

    class OptimizedMixtralRouter(SoftmaxTopKRouting, MixtralTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk`."""

        normalize_always = True
        float32_weights = True

else:  # pragma: no cover - transformers without the model
    OptimizedMixtralRouter = None


class MixtralPatch(FusedMoEPatch):
    model_type = "mixtral"
    module_path = MODULE
    block_class_name = "MixtralSparseMoeBlock"
    router_class = OptimizedMixtralRouter
