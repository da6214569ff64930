"""LongCat-Flash: ``LongcatFlashMoE`` (softmax router ``router`` with a correction bias over the routed
and the "zero" experts, fused SiLU-GLU experts).

Router (``LongcatFlashTopkRouter``): float32 logits from ``classifier.weight`` over ``E + Z``
experts (``Z = zero_expert_num``), softmax scores; the choice is the top-k of ``scores +
e_score_correction_bias``, the weights the uncorrected scores times ``routed_scaling_factor``
(float32, not renormalised). A choice of a zero expert (index ``>= E``) is an identity: the block adds
``x * (sum of the zero experts' weights)``; transformers sends those slots to real experts with weight
0, here they are dropped from the dispatch instead (``keep`` False), which adds the same nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.routing import Routing

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.longcat_flash.modeling_longcat_flash"
LongcatFlashTopkRouter = hf_class(MODULE, "LongcatFlashTopkRouter")


def _block_handles_zero_experts() -> bool:
    """Whether the installed block handles the zero experts itself, with a router returning
    ``(logits, weights, indices)`` (later releases; 5.17's experts do it, its router returns no
    logits: that form is not matched)."""
    block = hf_class(MODULE, "LongcatFlashMoE")
    return block is not None and "zero_expert_num" in block.forward.__code__.co_names


if LongcatFlashTopkRouter is not None and _block_handles_zero_experts():

    class OptimizedLongcatFlashRouter(LongcatFlashTopkRouter):
        """Same module and routing; returns ``(logits, weights, indices)`` over routed and zero experts."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat.float(), self.classifier.weight.float())
            scores = logits.softmax(dim=-1)
            choice = scores + self.e_score_correction_bias.unsqueeze(0)
            indices = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, indices) * self.routed_scaling_factor
            return logits, weights.to(logits.dtype), indices

else:  # pragma: no cover - transformers without the model
    OptimizedLongcatFlashRouter = None


def route_with_zero_experts(layer: LongcatFlashLayer, router: nn.Module, hidden_states: torch.Tensor, padding_mask):
    """The router's choices, zero experts' slots dropped; their summed weight kept for :meth:`add_shared`."""
    _, weights, indices = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
    identity = indices >= layer.num_routed_experts
    layer._identity_weights = weights.masked_fill(~identity, 0.0).sum(dim=-1, keepdim=True)
    return Routing(indices.masked_fill(identity, 0), weights.masked_fill(identity, 0.0), ~identity)


class LongcatFlashLayer(FusedMoELayer):
    """Routed experts plus the zero experts' identity share of each token."""

    def __init__(self, block: nn.Module, *args, **kwargs):
        super().__init__(block, *args, **kwargs)
        self.num_routed_experts = int(block.num_routed_experts)
        self._identity_weights: torch.Tensor | None = None
        self.route = self._route

    def _route(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        return route_with_zero_experts(self, router, hidden_states, padding_mask)

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        weights, self._identity_weights = self._identity_weights, None
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return routed + (flat * weights).to(routed.dtype).view(routed.shape)


class LongcatFlashPatch(FusedMoEPatch):
    model_type = "longcat_flash"
    module_path = MODULE
    block_class_name = "LongcatFlashMoE"
    router_name = "router"
    router_class = OptimizedLongcatFlashRouter
    layer_class = LongcatFlashLayer

    def matches(self, module: nn.Module) -> bool:
        return OptimizedLongcatFlashRouter is not None and super().matches(module)

    def check_block(self, block: nn.Module) -> None:
        if getattr(block.router.classifier, "bias", None) is not None:
            # transformers' router computes its logits from the classifier's weight alone.
            raise ValueError(
                "LongCat-Flash with router_bias=True: transformers' router leaves the classifier's bias out "
                "of its logits, so which routing is meant is unclear; not supported"
            )
