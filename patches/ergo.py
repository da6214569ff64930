"""Ergo: ``ErgoMoE`` (sigmoid router ``gate`` with a correction bias; two-matrix squared-ReLU experts
stored ``[E, in, out]``; a per-expert RMSNorm on each expert's output before the weighting; a shared
expert).

Router (``ErgoTopkRouter``): its float32-output linear (16-bit operands accumulated into float32 on
CUDA, float32 otherwise: the module's own ``linear`` is called), sigmoid scores; the choice is the
top-k of ``scores + e_score_correction_bias``, the weights the uncorrected scores renormalised
(``+ 1e-20``) times ``routed_scaling_factor``, rounded to the tokens' dtype and back to float32.
Experts: ``relu(x W_up)^2 W_down``; each (token, expert) output is normalised by the expert's own
RMSNorm weight (``post_expert_norm``), then weighted and summed; the block adds its shared expert. As
for Muse Spark, the norm needs whole output rows: each pair runs as its own top-1 row with weight 1,
and the norm, weighting and sum run in torch.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.experts import ExpertWeights, FusedExpertTensor
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.routing import topk_routing

from .fused import FusedMoEPatch, PreroutedLayer, hf_class

MODULE = "transformers.models.ergo.modeling_ergo"
ErgoTopkRouter = hf_class(MODULE, "ErgoTopkRouter")

if ErgoTopkRouter is not None:

    class OptimizedErgoRouter(ErgoTopkRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.linear.in_features)
            logits = self.linear(flat)
            scores = logits.sigmoid()
            indices = (scores + self.e_score_correction_bias).topk(self.top_k, sorted=False).indices
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
            return logits, weights.to(flat.dtype).float(), indices

else:  # pragma: no cover - transformers without the model
    OptimizedErgoRouter = None


class ErgoLayer(PreroutedLayer):
    """One top-1 row per (token, expert) pair, each output normalised by its expert's RMSNorm, then
    weighted and summed; plus the shared expert."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(x)
        k = indices.shape[1]
        experts = indices.reshape(-1, 1)
        gates = torch.ones(experts.shape, dtype=x.dtype, device=x.device)
        outputs = self.run_experts(x.repeat_interleave(k, dim=0), topk_routing(gates, experts))
        outputs = self.experts.post_expert_norm(outputs, experts.flatten())
        routed = (outputs.view(-1, k, shape[-1]) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        return routed.view(shape) + self.shared_experts(hidden_states)


class ErgoPatch(FusedMoEPatch):
    model_type = "ergo"
    module_path = MODULE
    block_class_name = "ErgoMoE"
    router_class = OptimizedErgoRouter
    layer_class = ErgoLayer

    def activation(self, block: nn.Module, config) -> Activation:
        from transformers.activations import ACT2CLS

        act_fn = block.experts.act_fn  # transformers builds relu2 here whatever the config says
        return Activation("relu2" if type(act_fn) is ACT2CLS["relu2"] else type(act_fn).__name__, act_fn)

    def weights(self, block: nn.Module) -> ExpertWeights:
        experts = block.experts
        return ExpertWeights(
            w1=FusedExpertTensor(experts.up_proj, "experts.up_proj", transposed=True),
            w2=FusedExpertTensor(experts.down_proj, "experts.down_proj", transposed=True),
        )
