"""Jamba: ``JambaSparseMoeBlock`` (softmax top-k router ``router``, fused SiLU-GLU experts; MoE every
other layer beside Mamba and attention layers).

Router (``JambaTopKRouter``): softmax over all experts in float32, top-k, the weights *not*
renormalised, cast to the tokens' dtype. Transformers versions whose Jamba block has no such router
(5.17 routes inside the block, with a plain linear) are not matched: ``optimize`` names the block as
unsupported there.
"""

from __future__ import annotations

from torch import nn

from .fused import FusedMoEPatch, SoftmaxTopKRouting, hf_class

MODULE = "transformers.models.jamba.modeling_jamba"
JambaTopKRouter = hf_class(MODULE, "JambaTopKRouter")

if JambaTopKRouter is not None:

    class OptimizedJambaRouter(SoftmaxTopKRouting, JambaTopKRouter):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk` (never renormalised)."""

        norm_topk_prob = False

else:  # pragma: no cover - transformers without the router class
    OptimizedJambaRouter = None


class JambaPatch(FusedMoEPatch):
    model_type = "jamba"
    module_path = MODULE
    block_class_name = "JambaSparseMoeBlock"
    router_name = "router"
    router_class = OptimizedJambaRouter

    def matches(self, module: nn.Module) -> bool:
        return OptimizedJambaRouter is not None and super().matches(module)
