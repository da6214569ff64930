"""JetMoE: ``JetMoeMoE`` (the MLP mixture; the attention mixture ``JetMoeMoA`` stays transformers').

Router (``JetMoeTopKGating``, child ``router``): float32 logits ``layer(x)``, the top-k logits, a
softmax over those k in float32, cast to the tokens' dtype. transformers' gating returns the rows
sorted by expert and the group sizes read on the host (``expert_size.tolist()``); ours returns the
per-token choice instead, the logits kept at index 4 where transformers' output recorder reads them.
Experts: two ``JetMoeParallelExperts`` children, ``input_linear.weight [E, 2F, D]`` (gate and up
halves, ``act(gate) * up`` with ``activation_function``) and ``output_linear.weight [E, D, F]``;
the block adds its ``bias [D]`` to the combined output.

The block has no ``experts`` child: the layer sees its two expert modules through a container that
is not registered (their parameters keep their names in the state dict).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from hf_moe_opt.experts import ExpertWeights
from hf_moe_opt.experts.activation import Activation, glu_activation
from hf_moe_opt.experts.activation import activation_name as name_of_activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, topk_routing

from .fused import FusedMoELayer, FusedMoEPatch, hf_class

MODULE = "transformers.models.jetmoe.modeling_jetmoe"
JetMoeTopKGating = hf_class(MODULE, "JetMoeTopKGating")

if JetMoeTopKGating is not None:

    class OptimizedJetMoeRouter(JetMoeTopKGating):
        """Same module and routing; returns ``(indices, None, weights, None, logits)`` with no host sync."""

        def forward(self, hidden_states: torch.Tensor):
            logits = self.layer(hidden_states).float()
            top, indices = logits.topk(self.top_k, dim=1)
            weights = torch.softmax(top, dim=1).type_as(hidden_states)
            return indices, None, weights, None, logits

else:  # pragma: no cover - transformers without the model
    OptimizedJetMoeRouter = None


class JetMoeExperts(nn.Module):
    """The block's two expert modules seen as one ``experts`` module (never registered in the layer)."""

    def __init__(self, input_linear: nn.Module, output_linear: nn.Module):
        super().__init__()
        self.input_linear = input_linear
        self.output_linear = output_linear


def _route(router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
    indices, _, weights, _, _ = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
    return topk_routing(weights, indices)


class JetMoeLayer(FusedMoELayer):
    """Routed experts plus the block's output bias."""

    def __init__(self, block: nn.Module, *args, **kwargs):
        block.__dict__["experts"] = JetMoeExperts(block.input_linear, block.output_linear)
        try:
            super().__init__(block, *args, **kwargs)
        finally:
            experts = block.__dict__.pop("experts")
        self.__dict__["experts"] = experts  # an attribute, not a submodule: no second state_dict entry

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return OptimizedMoE.forward(self, hidden_states) + self.bias


class JetMoePatch(FusedMoEPatch):
    model_type = "jetmoe"
    module_path = MODULE
    block_class_name = "JetMoeMoE"
    router_name = "router"
    router_class = OptimizedJetMoeRouter
    layer_class = JetMoeLayer
    route_function = staticmethod(_route)

    def activation(self, block: nn.Module, config) -> Activation:
        # JetMoE names its activation ``activation_function``, not ``hidden_act``.
        named = SimpleNamespace(hidden_act=getattr(config, "activation_function", None))
        return glu_activation(name_of_activation(block.activation, [named]), block.activation)

    def weights(self, block: nn.Module) -> ExpertWeights:
        return ExpertWeights.from_fused(block.input_linear.weight, block.output_linear.weight)
