"""Step-3.7: ``Step3p7SparseMoeBlock`` (sigmoid router ``gate`` with a correction bias, fused SiLU-GLU
experts with per-layer limits after the activation, a shared expert, scaled routed output).

Router (``Step3p7TopKRouter``): logits in the router weight's dtype, float32 sigmoid scores; the
choice is the top-k of ``scores + e_score_correction_bias``, the weights the uncorrected scores of
the chosen experts renormalised to sum to 1 (no epsilon): DeepSeek's ``greedy`` routing with sigmoid
scores (:func:`deepseek_topk`), as MiniMax-M2 routes but with the bias on the router. The block
multiplies the combined expert output by ``moe_router_scaling_factor`` (the layer's ``out_scale``).

Experts (``Step3p7Experts``): ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``; with a layer's
``limit`` set, ``min(act(gate), limit) * clamp(up, -limit, limit)`` (the limit applied after the
activation), else ``act(gate) * up``. Bailing hybrid's experts are the same code from transformers
5.25 on (:mod:`hf_moe_opt.patches.derived`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, act_limited_glu_activation, glu_activation
from hf_moe_opt.routing import deepseek_topk

from .deepseek_v2 import ScaledDeepseekMoELayer
from .fused import FusedMoEPatch, activation_name, hf_class

MODULE = "transformers.models.step3p7.modeling_step3p7"
Step3p7TopKRouter = hf_class(MODULE, "Step3p7TopKRouter")


class Step3p7Routing:
    """Forward for Step-3.7-style routers (mixed in before the HF class; MiniMax-M3's router is the
    same code): returns ``(logits, weights, indices)``."""

    def forward(self, hidden_states: torch.Tensor):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(flat.to(self.weight.dtype), self.weight)
        weights, indices = deepseek_topk(
            logits.float(),
            self.top_k,
            scoring="sigmoid",
            method="greedy",
            correction_bias=self.e_score_correction_bias,
            normalize=True,
        )
        return logits, weights, indices


if Step3p7TopKRouter is not None:

    class OptimizedStep3p7Router(Step3p7Routing, Step3p7TopKRouter):
        """Same module and routing."""

else:  # pragma: no cover - transformers without the model
    OptimizedStep3p7Router = None


def act_limited_experts_activation(block: nn.Module, config) -> Activation:
    """The GLU of experts whose optional ``limit`` applies after the activation."""
    experts = block.experts
    act_fn = experts.act_fn
    name = activation_name(act_fn, block, config)
    if experts.limit is None:
        return glu_activation(name, act_fn)
    return act_limited_glu_activation(name, act_fn, experts.limit)


class Step3p7Patch(FusedMoEPatch):
    model_type = "step3p7"
    module_path = MODULE
    block_class_name = "Step3p7SparseMoeBlock"
    router_class = OptimizedStep3p7Router
    layer_class = ScaledDeepseekMoELayer

    def activation(self, block: nn.Module, config) -> Activation:
        return act_limited_experts_activation(block, config)
