"""Granite MoE: ``GraniteMoeMoE`` (top-k router ``router``, fused SiLU-GLU experts; Granite's shared MLP,
where the model has one, sits beside the block in the decoder layer and is left alone).

Router (``GraniteMoeTopKRouter``): logits in the model dtype, then float32; top-k of the logits, a
softmax over those k in float32 (:func:`topk_softmax`), the weights cast to the tokens' dtype.
Granite MoE Shared, Granite 4.0 (``granitemoehybrid``) and Granite MoE SWA copy this block
(:mod:`.derived`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.routing import Routing, topk_routing, topk_softmax

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.granitemoe.modeling_granitemoe"
GraniteMoeTopKRouter = hf_class(MODULE, "GraniteMoeTopKRouter")


@functools.cache
def output_order(router_class: type) -> tuple[int, int, int]:
    """Where the installed transformers' Granite router puts ``(logits, weights, indices)`` in its
    output: transformers 5.17 returns ``(indices, weights, logits)``, later versions
    ``(logits, weights, indices)``. Found by running the HF forward once on a stand-in router
    (3 experts, top-1) and telling the outputs apart by shape and dtype."""
    hf = next(c for c in router_class.__mro__ if c.__module__.startswith("transformers."))
    stand_in = SimpleNamespace(weight=torch.eye(3, 4), top_k=1)
    with torch.no_grad():
        out = hf.forward(stand_in, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    logits = next(i for i, t in enumerate(out) if t.shape[-1] == 3)
    indices = next(i for i, t in enumerate(out) if not t.is_floating_point())
    return logits, 3 - logits - indices, indices


class GraniteMoeRouting:
    """Forward for Granite's router (mixed in before the HF class), its outputs in the HF order."""

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states, self.weight).float()
        weights, indices = topk_softmax(logits, self.top_k)
        out: list[torch.Tensor] = [logits, logits, logits]
        at_logits, at_weights, at_indices = output_order(type(self))
        out[at_logits], out[at_weights], out[at_indices] = logits, weights.type_as(hidden_states), indices
        return tuple(out)


def route_granite(router: nn.Module, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> Routing:
    out = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
    _, at_weights, at_indices = output_order(type(router))
    return topk_routing(out[at_weights], out[at_indices])


if GraniteMoeTopKRouter is not None:

    class OptimizedGraniteMoeRouter(GraniteMoeRouting, GraniteMoeTopKRouter):
        """Same module, routing from :func:`topk_softmax`."""

else:  # pragma: no cover - transformers without the model
    OptimizedGraniteMoeRouter = None


class GraniteMoePatch(FusedMoEPatch):
    model_type = "granitemoe"
    module_path = MODULE
    block_class_name = "GraniteMoeMoE"
    router_name = "router"
    router_class = OptimizedGraniteMoeRouter
    route_function = staticmethod(route_granite)
