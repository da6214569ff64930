"""NLLB-MoE: ``NllbMoeSparseMLP`` (top-2 router, experts ``fc1``/``fc2`` with biases).

Implements the correct routing semantics (see ``hf_moe_opt.routing.nllb``); transformers 5.x's own
``NllbMoeExperts.forward`` only ever runs experts 0 and 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_moe_opt.experts import ExpertStack, ExpertWeights
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, nllb_route, router_logits, token_padding_mask
from hf_moe_opt.routing.fused import try_fused_router

from .base import MoEPatch, swap_router_class

try:
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
except ImportError:  # pragma: no cover - transformers without the model
    NllbMoeTop2Router = None


def nllb_capacity(router: nn.Module, num_tokens: int, num_experts: int) -> int:
    """Per-expert capacity for ``num_tokens`` routed tokens (eval mode)."""
    fraction = router.moe_eval_capacity_token_fraction
    if fraction > 0:
        return math.ceil(fraction * num_tokens)
    configured = router._hf_moe_opt_config_capacity
    return configured if configured is not None else 2 * math.ceil(num_tokens / num_experts)


if NllbMoeTop2Router is not None:

    class OptimizedNllbMoeRouter(NllbMoeTop2Router):
        """Same module, our routing: ``forward([N, D], padding [N] | None) -> (Routing, None, logits)``."""

        def forward(self, hidden_states: torch.Tensor, padding: torch.Tensor | None = None):
            num_tokens = hidden_states.shape[0]
            capacity = None
            if self._hf_moe_opt_capacity == "model":
                capacity = nllb_capacity(self, num_tokens, self.num_experts)
            if padding is not None and self.router_ignore_padding_tokens:
                padding = None
            if self.second_expert_policy == "all" and padding is None and (capacity is None or capacity >= num_tokens):
                # Nothing can be dropped (decode steps): the fused kernels route.
                fused = try_fused_router(
                    hidden_states,
                    self.classifier.weight,
                    self.classifier.bias,
                    mode="nllb",
                    logits_dtype=self.dtype,
                    gates_dtype=hidden_states.dtype,
                )
                if fused is not None:
                    return Routing(fused[1], fused[2], None), None, fused[0]
            logits = router_logits(hidden_states, self.classifier, self.dtype)
            routing = nllb_route(
                logits,
                hidden_states.dtype,
                capacity=capacity,
                padding=None if self.router_ignore_padding_tokens else padding,
                second_expert_policy=self.second_expert_policy,
                normalize_before=self.normalize_router_prob_before_dropping,
                batch_prioritized=self.batch_prioritized_routing,
            )
            return routing, None, logits


def _route(router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> object:
    batch, seq_len, hidden = hidden_states.shape
    padding = token_padding_mask(padding_mask, batch, seq_len)
    return router(hidden_states.reshape(-1, hidden), padding)[0]


class NllbMoePatch(MoEPatch):
    model_type = "nllb-moe"
    module_path = "transformers.models.nllb_moe.modeling_nllb_moe"
    block_class_name = "NllbMoeSparseMLP"

    def build(self, block: nn.Module, config, *, capacity: str, backend: str) -> OptimizedMoE:
        experts = [block.experts[f"expert_{j}"] for j in range(block.num_experts)]
        weights = ExpertWeights(
            w1=ExpertStack([e.fc1.weight for e in experts], "experts.fc1"),
            w2=ExpertStack([e.fc2.weight for e in experts], "experts.fc2"),
            b1=ExpertStack([e.fc1.bias for e in experts], "experts.fc1.bias")
            if experts[0].fc1.bias is not None
            else None,
            b2=ExpertStack([e.fc2.bias for e in experts], "experts.fc2.bias")
            if experts[0].fc2.bias is not None
            else None,
        )
        activation = Activation(config.activation_function, experts[0].act)
        token_dropout = getattr(block.experts, "moe_token_dropout", getattr(config, "moe_token_dropout", 0.0))
        swap_router_class(
            block.router, OptimizedNllbMoeRouter, capacity=capacity, config_capacity=config.expert_capacity
        )
        return OptimizedMoE(
            block,
            weights,
            activation,
            _route,
            out_scale=1.0 - token_dropout,
            backend=backend,
            family=self.model_type,
        )
