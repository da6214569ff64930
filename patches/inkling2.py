"""Inkling 2: ``Inkling2SparseMoeBlock`` (Qwen3-MoE's block; a float32 router ``gate`` with a correction
bias; fused experts with a softcapped SwiGLU).

Router (``Inkling2TopKRouter``): the tokens cast to float32, logits ``x W^T``, scores by the router's
own ``score_fn`` (``ACT2FN[scoring_func]``, sigmoid in the released configs); the choice is the top-k
of ``scores + e_score_correction_bias``, the weights the uncorrected scores renormalised (``+ 1e-20``)
times ``routed_scaling_factor`` (float32). Experts: ``cap(gate, g) * sigmoid(gate) * cap(up, u)``
with ``cap(x, c) = c * tanh(x / c)`` and ``g, u = mlp_gate_softcap, mlp_up_softcap``, in float32
(``softcapped_swiglu``, in the Triton kernels too). Inkling 2 Loop's block is this code under other
names (:mod:`hf_moe_opt.patches.derived`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, softcapped_swiglu_activation

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.inkling2.modeling_inkling2"
Inkling2TopKRouter = hf_class(MODULE, "Inkling2TopKRouter")

if Inkling2TopKRouter is not None:

    class OptimizedInkling2Router(Inkling2TopKRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.float().reshape(-1, self.hidden_dim)
            logits = F.linear(flat, self.weight)
            scores = self.score_fn(logits)
            indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * self.routed_scaling_factor, indices

else:  # pragma: no cover - transformers without the model
    OptimizedInkling2Router = None


class Inkling2Patch(FusedMoEPatch):
    model_type = "inkling2"
    module_path = MODULE
    block_class_name = "Inkling2SparseMoeBlock"
    router_class = OptimizedInkling2Router

    def activation(self, block: nn.Module, config) -> Activation:
        act = block.experts.act_fn
        return softcapped_swiglu_activation(act.gate_softcap.softcap, act.up_softcap.softcap)
