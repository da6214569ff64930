"""Shared machinery for the families transformers 5.x stores with fused 3-D expert parameters.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and GPT-OSS share one shape: a sparse block
with a top-k router child (``gate`` or ``router``), an experts child holding ``gate_up_proj`` /
``down_proj`` (and for GPT-OSS their biases) as ``[E, ...]`` parameters, and sometimes shared
experts. The optimized layer:

* keeps every child of the HF block under its own name and in its own order (so ``state_dict``
  keys, values and order are unchanged), the router object included;
* swaps the router's class for a subclass computing the family's routing with
  :mod:`hf_moe_opt.routing.topk` and returning the same ``(router_logits, weights, indices)`` tuple,
  so transformers' ``OutputRecorder`` (index 0 of the router's output) still records the logits;
* uses the fused parameters in place (:class:`~hf_moe_opt.experts.weights.FusedExpertTensor`);
* adds shared experts and returns what the HF block returns (a tensor, or GPT-OSS's
  ``(hidden, router_scores)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_opt.experts import ExpertWeights
from hf_moe_opt.experts.activation import Activation, glu_activation
from hf_moe_opt.experts.activation import activation_name as name_of_activation
from hf_moe_opt.layer import OptimizedMoE
from hf_moe_opt.routing import Routing, softmax_topk, topk_routing
from hf_moe_opt.routing.fused import try_fused_router

from .base import MoEPatch, swap_router_class


def hf_class(module_path: str, name: str) -> type | None:
    """``module_path.name`` from the installed transformers, or None when it lacks it."""
    try:
        module = importlib.import_module(module_path)
    except ImportError:
        return None
    return getattr(module, name, None)


def activation_name(act_fn: Callable, block: nn.Module, config) -> str:
    """The ``hidden_act`` name of the experts' ``act_fn`` (see :func:`activation_name` of the experts
    package). A composite model (a VLM around a MoE text model) keeps it in a sub-config: the experts
    module's own config (set by transformers' ``use_experts_implementation``), the block's, the text
    config and the model's are asked in turn.
    """
    candidates = [getattr(block.experts, "config", None), getattr(block, "config", None)]
    try:
        candidates.append(config.get_text_config(decoder=True))
    except (AttributeError, ValueError):  # not a PreTrainedConfig, or several text configs
        pass
    candidates.append(config)
    return name_of_activation(act_fn, candidates)


def route_topk(router: nn.Module, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> Routing:
    """Call the (optimized) router on ``[B, S, D]`` tokens; it returns transformers' tuple."""
    _, weights, indices = router(hidden_states.reshape(-1, hidden_states.shape[-1]))
    return topk_routing(weights, indices)


class SoftmaxTopKRouting:
    """Forward for HF softmax top-k routers (Mixtral, Qwen2/3-MoE, OLMoE), mixed in before the HF class.

    Returns ``(logits, weights, indices)`` as the HF router does, with the routing of
    :func:`~hf_moe_opt.routing.softmax_topk`.
    """

    #: Renormalise the top-k weights whatever ``norm_topk_prob`` says (Mixtral, Qwen3.5-MoE).
    normalize_always = False
    #: Keep the weights in float32 instead of the logits' dtype (Mixtral).
    float32_weights = False

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        # Tokens and weight of two dtypes: transformers' F.linear raises, so the torch path below
        # must run (and raise) rather than the kernels, which would accept them.
        fused = None
        if x.dtype == self.weight.dtype:
            fused = try_fused_router(
                x,
                self.weight,
                None,
                mode="softmax_topk",
                top_k=self.top_k,
                logits_dtype=x.dtype,
                gates_dtype=torch.float32 if self.float32_weights else x.dtype,
                normalize=self.normalize_always or bool(self.norm_topk_prob),
            )
        if fused is not None:
            logits, indices, weights = fused
            return logits, weights, indices
        logits = F.linear(x, self.weight)
        weights, indices = softmax_topk(
            logits,
            self.top_k,
            normalize=self.normalize_always or bool(self.norm_topk_prob),
            weights_dtype=None if self.float32_weights else logits.dtype,
        )
        return logits, weights, indices


class _RouterAlias:
    """The HF block seen with its router under the name :class:`OptimizedMoE` reads (``router``)."""

    def __init__(self, block: nn.Module, router_name: str):
        self._block = block
        self.router = getattr(block, router_name)

    def __getattr__(self, name: str):
        return getattr(self._block, name)


class FusedMoELayer(OptimizedMoE):
    """:class:`OptimizedMoE` for a block with fused experts, its children kept under their HF names.

    Args:
        block: the HF sparse block.
        router_name: the block's router attribute (``"gate"`` or ``"router"``).
        returns_router_scores: return ``(hidden, router_scores [N, k])`` as GPT-OSS's block does.
        Other arguments as :class:`OptimizedMoE`.

    Subclasses add shared experts in :meth:`add_shared`.
    """

    def __init__(
        self,
        block: nn.Module,
        weights: ExpertWeights,
        activation: Activation,
        route: Callable,
        *,
        router_name: str = "gate",
        returns_router_scores: bool = False,
        backend: str = "auto",
        family: str = "",
    ):
        super().__init__(_RouterAlias(block, router_name), weights, activation, route, backend=backend, family=family)
        self._original = (block,)
        # Re-register the block's children under their names and in their order; keep any child the
        # base class added itself.
        added = {k: v for k, v in self._modules.items() if k not in ("router", "experts")}
        self._modules.clear()
        self._modules.update(block._modules)
        self._modules.update(added)
        # Tensors the block holds itself (MiniMax-M2's correction bias) keep their names too.
        self._parameters.update(block._parameters)
        self._buffers.update(block._buffers)
        self._non_persistent_buffers_set |= block._non_persistent_buffers_set
        self._router_name = router_name
        self.returns_router_scores = returns_router_scores
        self._last_gates: torch.Tensor | None = None
        self.route = self._route_and_keep_gates if returns_router_scores else route
        self._family_route = route

    @property
    def router(self) -> nn.Module:
        return self._modules[self.__dict__.get("_router_name", "router")]

    def _route_and_keep_gates(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        routing = self._family_route(router, hidden_states, padding_mask)
        self._last_gates = routing.gates
        return routing

    def extra_repr(self) -> str:
        w1 = self.weights.w1.tensor
        d_ff = w1.shape[1] // 2 if self.activation.gated else w1.shape[1]
        act = self.activation
        limited = f" ({act.glu}, limit={act.limit})" if act.limit is not None else ""
        return (
            f"family={self.family}, num_experts={w1.shape[0]}, d_model={w1.shape[2]}, d_ff={d_ff}, "
            f"activation={act.name}{limited}, backend={self.backend}"
        )

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """``routed`` plus the block's shared experts (none here)."""
        return routed

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routed = super().forward(hidden_states)
        out = self.add_shared(hidden_states, routed)
        if self.returns_router_scores:
            gates, self._last_gates = self._last_gates, None
            return out, gates
        return out


class ScaledOutput:
    """Mixed in before a layer class: the combined routed output times the block's
    ``routed_scaling_factor`` (the layer's ``out_scale``), for blocks that scale after the experts
    rather than in the router's weights (Step-3.7, Laguna, MiniMax-M3, Beam)."""

    def __init__(self, block: nn.Module, *args, **kwargs):
        super().__init__(block, *args, **kwargs)
        self.out_scale = float(block.routed_scaling_factor)


class SharedExpertLayer(FusedMoELayer):
    """Routed experts plus the block's ungated ``shared_expert`` (Lara-mini, Flint)."""

    def add_shared(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return routed + self.shared_expert(hidden_states)


class PreroutedLayer(FusedMoELayer):
    """A layer whose forward routes before it makes the experts' inputs (Llama 4's scaled token copies,
    Nemotron-H's latent projection): :meth:`run_experts` hands that routing to the base forward, which
    then dispatches the given tokens (observers, caches and graphs see it as any routing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: Routing | None = None
        self.route = self._pending_routing

    def _pending_routing(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        return self._pending

    def run_experts(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts on ``tokens`` ``[N, D]`` routed by ``routing`` (``N`` rows), combined."""
        self._pending = routing
        try:
            return OptimizedMoE.forward(self, tokens)
        finally:
            self._pending = None


class BlockBiasLayer(FusedMoELayer):
    """A layer whose router is called with a bias the block holds itself (MiniMax-M2's
    ``e_score_correction_bias``, LFM2-MoE's and AFMoE's ``expert_bias``): a buffer (or parameter) of
    this layer under the same name, so moving or casting the layer reaches it; None where the block
    has none."""

    #: The block's attribute holding the bias.
    bias_name: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._family_route = self._route_with_bias
        if not self.returns_router_scores:
            self.route = self._route_with_bias

    def _route_with_bias(self, router: nn.Module, hidden_states: torch.Tensor, padding_mask) -> Routing:
        bias = self._buffers.get(self.bias_name)
        if bias is None:  # AFMoE holds its bias as a (frozen) parameter
            bias = self._parameters.get(self.bias_name)
        _, weights, indices = router(hidden_states.reshape(-1, hidden_states.shape[-1]), bias)
        return topk_routing(weights, indices)


class FusedMoEPatch(MoEPatch):
    """A family whose block has a top-k router child and a fused experts child.

    Subclasses set ``model_type``, ``module_path``, ``block_class_name`` and ``router_class`` (the
    optimized router subclass, None when the installed transformers lacks the family), and may
    override ``router_name``, ``transposed``, ``layer_class``, ``route_function`` and :meth:`activation`.
    """

    router_name: str = "gate"
    router_class: type[nn.Module] | None = None
    transposed: bool = False
    returns_router_scores: bool = False
    layer_class: type[FusedMoELayer] = FusedMoELayer
    #: ``(router, hidden_states, padding_mask) -> Routing``: how the layer calls the router.
    route_function: Callable = staticmethod(route_topk)

    def activation(self, block: nn.Module, config) -> Activation:
        """The experts' GLU: ``act(gate) * up`` on ``gate_up_proj``'s concatenated halves."""
        act_fn = block.experts.act_fn
        return glu_activation(activation_name(act_fn, block, config), act_fn)

    def weights(self, block: nn.Module) -> ExpertWeights:
        experts = block.experts
        return ExpertWeights.from_fused(
            experts.gate_up_proj,
            experts.down_proj,
            gate_up_bias=getattr(experts, "gate_up_proj_bias", None),
            down_bias=getattr(experts, "down_proj_bias", None),
            transposed=self.transposed,
        )

    def restore(self, layer: OptimizedMoE) -> nn.Module:
        block = super().restore(layer)
        # The layer's own tensors may have been replaced (moved, cast): the block takes them back.
        for name in block._parameters:
            block._parameters[name] = layer._parameters[name]
        for name in block._buffers:
            block._buffers[name] = layer._buffers[name]
        return block

    def check_block(self, block: nn.Module) -> None:
        """Raise ValueError for a block this family's routing cannot run (a setting the router lacks)."""

    def router_class_for(self, block: nn.Module) -> type[nn.Module] | None:
        """The optimized router class for ``block``'s router (families with one router class: ``router_class``)."""
        return self.router_class

    def build(self, block: nn.Module, config, *, capacity: str, backend: str) -> OptimizedMoE:
        # These families have no capacity: "model" and "none" route identically.
        router_class = self.router_class_for(block)
        if router_class is None:
            raise ValueError(f"the installed transformers has no router class for {self.model_type}")
        self.check_block(block)
        weights = self.weights(block)
        activation = self.activation(block, config)
        swap_router_class(getattr(block, self.router_name), router_class)
        return self.layer_class(
            block,
            weights,
            activation,
            self.route_function,
            router_name=self.router_name,
            returns_router_scores=self.returns_router_scores,
            backend=backend,
            family=self.model_type,
        )
