"""Nemotron-H: ``NemotronHMoE`` (DeepSeek-V3-style sigmoid router ``gate`` in float32, two-matrix
squared-ReLU experts, optional latent projections around the experts, shared experts).

Router (``NemotronHTopkRouter``): float32 logits (tokens and weight widened), sigmoid scores, the
choice on ``scores + e_score_correction_bias`` within the ``topk_group`` best of ``n_group`` groups
(ranked by their two best corrected scores; the rest masked to -inf), weights = the chosen
uncorrected scores, renormalised (``+ 1e-20``) when ``norm_topk_prob``, times
``routed_scaling_factor``; float32 weights.

Block: routed on the hidden states; the experts (``up_proj [E, F, L]``, ``down_proj [E, L, F]``,
``act = mlp_hidden_act``, relu2 in the released models) run on ``fc1_latent_proj(x)`` (``L`` the
latent size, or ``D`` with identity projections), their sum goes through ``fc2_latent_proj``, and the
shared experts' output on ``x`` is added.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.experts import ExpertWeights, FusedExpertTensor
from hf_moe_opt.experts.activation import Activation

from .deepseek_v3 import DeepseekV3Routing
from .fused import FusedMoEPatch, PreroutedLayer, hf_class, route_topk

MODULE = "transformers.models.nemotron_h.modeling_nemotron_h"
NemotronHTopkRouter = hf_class(MODULE, "NemotronHTopkRouter")

if NemotronHTopkRouter is not None:

    class OptimizedNemotronHRouter(DeepseekV3Routing, NemotronHTopkRouter):
        """Same module, DeepSeek-V3's routing (the same code under other names)."""

else:  # pragma: no cover - transformers without the model
    OptimizedNemotronHRouter = None


class NemotronHLayer(PreroutedLayer):
    """Routed on the hidden states, experts on their latent projection, plus the shared experts."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        routing = route_topk(self.router, hidden_states, None)
        routed = self.run_experts(self.fc1_latent_proj(hidden_states.reshape(-1, shape[-1])), routing)
        return self.fc2_latent_proj(routed).view(shape) + self.shared_experts(hidden_states)


class NemotronHPatch(FusedMoEPatch):
    model_type = "nemotron_h"
    module_path = MODULE
    block_class_name = "NemotronHMoE"
    router_class = OptimizedNemotronHRouter
    layer_class = NemotronHLayer

    def activation(self, block: nn.Module, config) -> Activation:
        """The experts' elementwise ``mlp_hidden_act`` (named so the kernels take it only when it is the
        activation transformers built)."""
        from transformers.activations import ACT2CLS

        act_fn = block.experts.act_fn
        name = getattr(block.config, "mlp_hidden_act", None)
        cls = ACT2CLS.get(name) if isinstance(name, str) else None
        if isinstance(cls, tuple):
            cls = cls[0]
        return Activation(name if cls is not None and type(act_fn) is cls else type(act_fn).__name__, act_fn)

    def weights(self, block: nn.Module) -> ExpertWeights:
        experts = block.experts
        return ExpertWeights(
            w1=FusedExpertTensor(experts.up_proj, "experts.up_proj"),
            w2=FusedExpertTensor(experts.down_proj, "experts.down_proj"),
        )
