"""DeepSeek-V2: ``DeepseekV2Moe`` (softmax scores, greedy or group-limited top-k router ``gate``,
``routed_scaling_factor``, fused SiLU-GLU experts, shared experts).

Router (``DeepseekV2TopkRouter``): float32 logits and softmax; ``topk_method="greedy"`` takes the
top-k of all experts, ``"group_limited_greedy"`` zeroes the experts outside the ``topk_group``
groups with the best maximum score first; the k scores times ``routed_scaling_factor`` are the
weights (float32, not renormalised). The block adds ``shared_experts(x)``, an ordinary module of the
layer that always runs (it stays resident under any store).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.routing import deepseek_topk

from .fused import FusedMoELayer, FusedMoEPatch, ScaledOutput, hf_class

MODULE = "transformers.models.deepseek_v2.modeling_deepseek_v2"
DeepseekV2TopkRouter = hf_class(MODULE, "DeepseekV2TopkRouter")

if DeepseekV2TopkRouter is not None:

    class OptimizedDeepseekV2Router(DeepseekV2TopkRouter):
        """Same module, routing from :func:`deepseek_topk`; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.view(-1, self.hidden_dim)
            logits = F.linear(flat.type(torch.float32), self.weight.type(torch.float32))
            weights, indices = deepseek_topk(
                logits,
                self.top_k,
                scoring="softmax",
                method=self.topk_method,
                n_group=self.num_group,
                topk_group=self.topk_group,
                scaling=self.routed_scaling_factor,
            )
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedDeepseekV2Router = None


class DeepseekMoELayer(FusedMoELayer):
    """Routed experts plus the always-active shared experts (DeepSeek-V2 and V3)."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return routed + self.shared_experts(hidden_states)


class ScaledDeepseekMoELayer(ScaledOutput, DeepseekMoELayer):
    """The routed output times the block's ``routed_scaling_factor``, plus the shared experts."""


V2_TOPK_METHODS = ("greedy", "group_limited_greedy")  # what DeepSeek-V2's router implements


class DeepseekV2Patch(FusedMoEPatch):
    model_type = "deepseek_v2"
    module_path = MODULE
    block_class_name = "DeepseekV2Moe"
    router_class = OptimizedDeepseekV2Router
    layer_class = DeepseekMoELayer

    def check_block(self, block: nn.Module) -> None:
        method = getattr(getattr(block, self.router_name), "topk_method", None)
        if method not in V2_TOPK_METHODS:
            # "noaux_tc" is DeepSeek-V3's: V2's own router cannot run it, so neither do we.
            raise ValueError(
                f"DeepSeek-V2 topk_method={method!r} is not one its router implements; "
                f"choose one of {', '.join(V2_TOPK_METHODS)}"
            )
