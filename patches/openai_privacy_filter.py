"""OpenAI Privacy Filter: ``OpenAIPrivacyFilterMLP`` (GPT-OSS's block in an encoder for token
classification, float32 throughout, clamped SwiGLU on concatenated halves).

Router (``OpenAIPrivacyFilterTopKRouter``): float32 logits ``x W^T + b``, top-k of the logits, float32
softmax over those k, divided by k. Experts: GPT-OSS's biased, transposed experts (``gate_up_proj``
``[E, D, 2F]``) with its clamped SwiGLU on the *concatenated* halves, computed in float32 (the
kernels accumulate in float32 too); the block multiplies the combined output by k again and returns
``(hidden, router_scores)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, clamped_swiglu_activation
from hf_moe_opt.routing import topk_softmax

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.openai_privacy_filter.modeling_openai_privacy_filter"
OpenAIPrivacyFilterTopKRouter = hf_class(MODULE, "OpenAIPrivacyFilterTopKRouter")

if OpenAIPrivacyFilterTopKRouter is not None:

    class OptimizedOpenAIPrivacyFilterRouter(OpenAIPrivacyFilterTopKRouter):
        """Same module and routing; returns ``(logits, scores, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states.float(), self.weight.float(), self.bias.float())
            weights, indices = topk_softmax(logits, self.top_k)
            return logits, weights / self.top_k, indices

else:  # pragma: no cover - transformers without the model
    OptimizedOpenAIPrivacyFilterRouter = None


class OpenAIPrivacyFilterLayer(FusedMoELayer):
    """The combined output times k (the block's ``num_experts``, which holds ``num_experts_per_tok``)."""

    def __init__(self, block: nn.Module, *args, **kwargs):
        super().__init__(block, *args, **kwargs)
        self.out_scale = float(block.num_experts)


class OpenAIPrivacyFilterPatch(FusedMoEPatch):
    model_type = "openai_privacy_filter"
    module_path = MODULE
    block_class_name = "OpenAIPrivacyFilterMLP"
    router_name = "router"
    router_class = OptimizedOpenAIPrivacyFilterRouter
    layer_class = OpenAIPrivacyFilterLayer
    transposed = True
    returns_router_scores = True

    def activation(self, block: nn.Module, config) -> Activation:
        experts = block.experts
        return clamped_swiglu_activation(experts.alpha, experts.limit, interleaved=False)
