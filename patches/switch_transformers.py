"""Switch Transformers: ``SwitchTransformersSparseMLP`` (top-1 router, experts ``wi``/``wo``)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from hf_moe_opt.experts import ExpertStack, ExpertWeights
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, router_logits, switch_route
from hf_moe_opt.routing.fused import try_fused_router
from hf_moe_opt.routing.switch import switch_keep

from .base import MoEPatch, swap_router_class

try:
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersTop1Router,
    )
except ImportError:  # pragma: no cover - transformers without the model
    SwitchTransformersTop1Router = None


@functools.cache
def records_top_probability() -> bool:
    """Whether the installed router's output[2] (what transformers records as ``router_logits``) is the
    top-1 probability ``[B, S, 1]`` rather than the logits: transformers 5.0-5.17 overwrite the name."""
    from transformers import SwitchTransformersConfig

    router = SwitchTransformersTop1Router(SwitchTransformersConfig(d_model=4, num_experts=3))
    with torch.no_grad():
        out = router(torch.randn(1, 2, 4))
    return out[2].shape[-1] == 1


if SwitchTransformersTop1Router is not None:

    class OptimizedSwitchRouter(SwitchTransformersTop1Router):
        """Same module, our routing: returns ``(Routing, None, recorded)``.

        Index 2 is what transformers records as ``router_logits``; it carries exactly what the installed
        version's own router puts there.
        """

        def forward(self, hidden_states: torch.Tensor, padding_mask=None):
            capacity = self.expert_capacity if self._hf_moe_opt_capacity == "model" else None
            # The fused kernels make the choice at any batch size; a binding capacity is then applied
            # by the same rule as the torch path (``switch_keep``).
            fused = try_fused_router(
                hidden_states.reshape(-1, hidden_states.shape[-1]),
                self.classifier.weight,
                self.classifier.bias,
                mode="switch",
                logits_dtype=self.dtype,
                gates_dtype=hidden_states.dtype,
            )
            if fused is not None:
                logits = fused[0].view(*hidden_states.shape[:-1], -1)
                keep = switch_keep(fused[1], hidden_states.shape[0], logits.shape[-1], capacity)
                routing = Routing(fused[1], fused[2], keep)
            else:
                logits = router_logits(hidden_states, self.classifier, self.dtype)
                routing = switch_route(logits, hidden_states.dtype, capacity)
            recorded = routing.gates.view(*logits.shape[:-1], 1) if self._hf_moe_opt_records_prob else logits
            return routing, None, recorded


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
        swap_router_class(
            block.router, OptimizedSwitchRouter, capacity=capacity, records_prob=records_top_probability()
        )
        return OptimizedMoE(block, weights, activation, _route, backend=backend, family=self.model_type)
