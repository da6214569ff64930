"""Inkling: ``InklingMoE`` (sigmoid router ``gate`` over routed and shared experts, fused SiLU-GLU
experts, shared experts weighted per token).

Router (``InklingTopkRouter``): float32 logits with autocast off, over the ``E`` routed experts and
then the ``S`` shared ones. The choice is the top-k of the routed experts' sigmoid scores plus the
correction bias. The k chosen logits and the S shared logits are then weighted together: each
weight is the sigmoid of its logit over the sum of the k + S sigmoids (a softmax of log-sigmoids),
times ``route_scale`` and the router's learned ``global_scale``, cast to the tokens' dtype. The first
k weights combine the routed experts; the last S (the "gammas") scale the shared experts, which the
block adds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.routing import Routing, topk_routing

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.inkling.modeling_inkling"
InklingTopkRouter = hf_class(MODULE, "InklingTopkRouter")

if InklingTopkRouter is not None:

    class OptimizedInklingRouter(InklingTopkRouter):
        """Same module and routing; returns ``(routed logits, weights, indices, shared gammas)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            shared = self.n_shared_experts
            with torch.autocast(flat.device.type, enabled=False):
                logits = F.linear(flat.float(), self.weight.float())
                routed, shared_logits = logits[:, :-shared], logits[:, -shared:]
                choice = routed.sigmoid() + self.e_score_correction_bias.float()
                indices = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
                log_scores = F.logsigmoid(torch.cat([routed.gather(1, indices), shared_logits], dim=-1))
                weights = torch.exp(log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True))
                weights = weights * self.route_scale * self.global_scale.float()
            weights = weights.to(hidden_states.dtype)
            return routed, weights[:, : self.top_k], indices, weights[:, self.top_k :]

else:  # pragma: no cover - transformers without the model
    OptimizedInklingRouter = None


class InklingLayer(FusedMoELayer):
    """Routed experts plus the shared experts, each weighted by the router's per-token gamma."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gammas: torch.Tensor | None = None
        self.route = self._route

    def _route(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        _, weights, indices, self._gammas = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return topk_routing(weights, indices)

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        gammas, self._gammas = self._gammas, None
        return routed + self.shared_experts(hidden_states, gammas=gammas)


class InklingPatch(FusedMoEPatch):
    model_type = "inkling"
    module_path = MODULE
    block_class_name = "InklingMoE"
    router_class = OptimizedInklingRouter
    layer_class = InklingLayer

    def check_block(self, block: nn.Module) -> None:
        if block.gate.n_shared_experts < 1:
            raise ValueError("Inkling's router needs at least one shared expert (n_shared_experts >= 1)")
