"""Hunyuan-A13B: ``HunYuanMoEV1Moe`` (softmax router ``gate`` over its float32 linear ``wg``, fused
SiLU-GLU experts, a shared MLP that always runs).

Router (``HunYuanMoEV1Gate``): logits from ``wg`` (tokens widened to float32 when ``wg`` is float32),
softmax in float32, top-k, always renormalised, weights cast to the logits' dtype. The block adds
``shared_mlp(x)``.
"""

from __future__ import annotations

import torch

from hf_moe_opt.routing import softmax_topk

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe"
HunYuanMoEV1Gate = hf_class(MODULE, "HunYuanMoEV1Gate")

if HunYuanMoEV1Gate is not None:

    class OptimizedHunYuanMoEV1Gate(HunYuanMoEV1Gate):
        """Same module, routing from :func:`~hf_moe_opt.routing.softmax_topk`."""

        def forward(self, hidden_states: torch.Tensor):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            if self.wg.weight.dtype == torch.float32:
                x = x.float()
            logits = self.wg(x)
            weights, indices = softmax_topk(logits, self.top_k, normalize=True, weights_dtype=logits.dtype)
            return logits, weights, indices

else:  # pragma: no cover - transformers without the model
    OptimizedHunYuanMoEV1Gate = None


class HunYuanMoEV1Layer(FusedMoELayer):
    """Routed experts plus the shared MLP."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return routed + self.shared_mlp(hidden_states)


class HunYuanMoEV1Patch(FusedMoEPatch):
    model_type = "hunyuan_v1_moe"
    module_path = MODULE
    block_class_name = "HunYuanMoEV1Moe"
    router_class = OptimizedHunYuanMoEV1Gate
    layer_class = HunYuanMoEV1Layer
