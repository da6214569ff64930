"""Muse Spark: ``MuseSparkMoE`` (sigmoid router ``gate`` with a correction bias; experts in a smaller
latent space between a projection and its norm; an RMSNorm on each expert's output before the
weighting).

Router (``MuseSparkTopkRouter``): float32 logits times ``output_multiplier``, sigmoid scores; the
choice is the top-k of ``scores + e_score_correction_bias``, the weights the uncorrected scores
renormalised (``+ 1e-15``) times ``routed_scaling_factor`` (float32). The block routes on the hidden
states, runs the experts on ``pre_expert_norm(pre_expert_proj(x))``, normalises every expert output
with the experts' ``post_expert_norm`` *before* weighting it, sums a token's k outputs and projects
back with ``post_expert_proj``. A norm over a whole output row cannot run inside GEMM2's column tiles:
the layer runs each (token, expert) pair as its own top-1 row with weight 1 (one latent copy per
slot), then normalises, weights and sums the k rows in torch.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import topk_routing

from .fused import FusedMoEPatch, PreroutedLayer, hf_class

MODULE = "transformers.models.muse_spark.modeling_muse_spark"
MuseSparkTopkRouter = hf_class(MODULE, "MuseSparkTopkRouter")

if MuseSparkTopkRouter is not None:

    class OptimizedMuseSparkRouter(MuseSparkTopkRouter):
        """Same module and routing; returns ``(logits, weights, indices)``."""

        def forward(self, hidden_states: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat.float(), self.weight.float()) * self.output_multiplier
            scores = self.scoring_function(logits)
            indices = torch.topk(scores + self.e_score_correction_bias, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_topk_prob_eps)
            return logits, weights * self.routed_scaling_factor, indices

else:  # pragma: no cover - transformers without the model
    OptimizedMuseSparkRouter = None


class MuseSparkLayer(PreroutedLayer):
    """Latent experts, one top-1 row per (token, expert) pair, each output normalised, then weighted,
    summed and projected back."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(x)
        latent = self.pre_expert_norm(self.pre_expert_proj(x))
        k = indices.shape[1]
        copies = latent.repeat_interleave(k, dim=0)  # token-major: a token's k slots are adjacent rows
        experts = indices.reshape(-1, 1)
        gates = torch.ones(experts.shape, dtype=latent.dtype, device=latent.device)
        outputs = self.experts.post_expert_norm(self.run_experts(copies, topk_routing(gates, experts)))
        routed = (outputs.view(-1, k, outputs.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)
        return self.post_expert_proj(routed.to(latent.dtype)).view(shape)


class MuseSparkPatch(FusedMoEPatch):
    model_type = "muse_spark"
    module_path = MODULE
    block_class_name = "MuseSparkMoE"
    router_class = OptimizedMuseSparkRouter
    layer_class = MuseSparkLayer
