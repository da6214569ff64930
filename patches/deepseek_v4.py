"""DeepSeek-V4: ``DeepseekV4SparseMoeBlock`` (learned or hash routing, limited-SwiGLU experts, a
shared expert).

Routers (``gate``): logits ``x @ W.T`` in the tokens' dtype, scores ``score_fn(logits)`` (the
config's ``scoring_func``, ``sqrtsoftplus`` by default), in that dtype too.

* ``DeepseekV4TopKRouter`` (``mlp_layer_types`` ``"moe"``): the experts are the top-k of
  ``scores + e_score_correction_bias`` (a float32 buffer, so the choice is made in float32);
* ``DeepseekV4HashRouter`` (``"hash_moe"``, the first layers): the experts are a fixed table lookup,
  ``tid2eid[input_ids]`` ``[vocab, k]``: the block takes the token ids beside the hidden states.

Either way the weights are the chosen experts' scores over their sum (``+ 1e-20``, whatever
``norm_topk_prob`` says), times ``routed_scaling_factor``. Experts (``DeepseekV4Experts``):
``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]`` with ``silu(min(gate, limit)) * clamp(up,
-limit, limit)`` on the concatenated halves, ``limit = swiglu_limit``. The block adds
``shared_experts(x)`` (the same limited SwiGLU, an ordinary module of the layer).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts.activation import Activation, limited_swiglu_activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, topk_routing

from .deepseek_v2 import DeepseekMoELayer
from .fused import FusedMoEPatch, activation_name, hf_class

MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"
DeepseekV4TopKRouter = hf_class(MODULE, "DeepseekV4TopKRouter")
DeepseekV4HashRouter = hf_class(MODULE, "DeepseekV4HashRouter")


def scored_topk(
    scores: torch.Tensor, top_k: int, correction_bias: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, indices)``: the top-k of ``scores + correction_bias``, weighted by their
    uncorrected scores renormalised (``+ 1e-20``) and scaled, in the scores' dtype."""
    indices = torch.topk(scores + correction_bias, top_k, dim=-1, sorted=False).indices
    return _weights(scores, indices, scaling), indices


def _weights(scores: torch.Tensor, indices: torch.Tensor, scaling: float) -> torch.Tensor:
    chosen = scores.gather(1, indices)
    return chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * scaling


class DeepseekV4Routing:
    """Forward for both DeepSeek-V4 routers (mixed in before the HF class): ``(logits, weights,
    indices)``; the hash router needs the tokens' ids."""

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(flat, self.weight)
        scores = self.score_fn(logits)
        if not hasattr(self, "tid2eid"):
            weights, indices = scored_topk(scores, self.top_k, self.e_score_correction_bias, self.routed_scaling_factor)
            return logits, weights, indices
        if input_ids is None:
            raise ValueError(
                "DeepSeek-V4's hash-routed layers choose experts by token id: call the model with input_ids "
                "(inputs_embeds alone cannot be routed)"
            )
        if input_ids.numel() != flat.shape[0]:
            raise ValueError(f"{input_ids.numel()} token ids for {flat.shape[0]} tokens")
        indices = self.tid2eid[input_ids.reshape(-1)].long()
        return logits, _weights(scores, indices, self.routed_scaling_factor), indices


def _optimized(hf_router: type | None) -> type | None:
    if hf_router is None:  # pragma: no cover - transformers without the model
        return None
    return type(f"Optimized{hf_router.__name__}", (DeepseekV4Routing, hf_router), {"__doc__": "Same module."})


OptimizedDeepseekV4TopKRouter = _optimized(DeepseekV4TopKRouter)
OptimizedDeepseekV4HashRouter = _optimized(DeepseekV4HashRouter)


class DeepseekV4MoELayer(DeepseekMoELayer):
    """Routed experts plus the shared expert; the block's ``input_ids`` reach a hash router."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._input_ids: torch.Tensor | None = None
        self.route = self._route_with_ids

    def _route_with_ids(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        _, weights, indices = router(hidden_states, self._input_ids)
        return topk_routing(weights, indices)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._input_ids = input_ids
        try:
            routed = OptimizedMoE.forward(self, hidden_states)
        finally:
            self._input_ids = None
        return self.add_shared(hidden_states, routed)


class DeepseekV4Patch(FusedMoEPatch):
    model_type = "deepseek_v4"
    module_path = MODULE
    block_class_name = "DeepseekV4SparseMoeBlock"
    router_class = OptimizedDeepseekV4TopKRouter
    layer_class = DeepseekV4MoELayer

    def activation(self, block: nn.Module, config) -> Activation:
        name = activation_name(block.experts.act_fn, block, config)
        if name != "silu":
            raise ValueError(f"DeepSeek-V4 experts with hidden_act={name!r}: only SiLU's limited SwiGLU is supported")
        return limited_swiglu_activation(block.experts.limit)

    def router_class_for(self, block: nn.Module) -> type[nn.Module] | None:
        # Two router classes: the layer's router becomes the subclass of its own.
        hashed = DeepseekV4HashRouter is not None and type(block.gate) is DeepseekV4HashRouter
        return OptimizedDeepseekV4HashRouter if hashed else OptimizedDeepseekV4TopKRouter
