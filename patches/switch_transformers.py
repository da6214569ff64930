"""Switch Transformers: ``SwitchTransformersSparseMLP`` (top-1 router, experts ``wi``/``wo``)."""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.experts import ExpertStack, ExpertWeights
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import router_logits, switch_route

from .base import MoEPatch, swap_router_class

try:
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersTop1Router,
    )
except ImportError:  # pragma: no cover - transformers without the model
    SwitchTransformersTop1Router = None


if SwitchTransformersTop1Router is not None:

    class OptimizedSwitchRouter(SwitchTransformersTop1Router):
        """Same module, our routing: returns ``(Routing, None, router_logits)``.

        Index 2 is what transformers records as ``router_logits``.
        """

        def forward(self, hidden_states: torch.Tensor, padding_mask=None):
            logits = router_logits(hidden_states, self.classifier, self.dtype)
            capacity = self.expert_capacity if self._hf_moe_opt_capacity == "model" else None
            return switch_route(logits, hidden_states.dtype, capacity), None, logits


def _route(router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> object:
    return router(hidden_states)[0]


class SwitchTransformersPatch(MoEPatch):
    model_type = "switch_transformers"
    module_path = "transformers.models.switch_transformers.modeling_switch_transformers"
    block_class_name = "SwitchTransformersSparseMLP"

    def build(self, block: nn.Module, config, *, capacity: str, backend: str) -> OptimizedMoE:
        experts = [block.experts[f"expert_{j}"] for j in range(len(block.experts))]
        weights = ExpertWeights(
            w1=ExpertStack([e.wi.weight for e in experts], "experts.wi"),
            w2=ExpertStack([e.wo.weight for e in experts], "experts.wo"),
            b1=ExpertStack([e.wi.bias for e in experts], "experts.wi.bias") if experts[0].wi.bias is not None else None,
            b2=ExpertStack([e.wo.bias for e in experts], "experts.wo.bias") if experts[0].wo.bias is not None else None,
        )
        activation = Activation(config.dense_act_fn, experts[0].act)
        swap_router_class(block.router, OptimizedSwitchRouter, capacity=capacity)
        return OptimizedMoE(block, weights, activation, _route, backend=backend, family=self.model_type)
