"""The optimized MoE layer: router -> dispatch -> experts -> combine, swapped in for a HF block.

The layer keeps the HF block's ``router`` and ``experts`` children (same objects, same parameter
names), so ``state_dict``/``save_pretrained`` are unchanged and transformers' output recorders,
which hook the router module, still see the router logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .experts import ExpertWeights, get_backend, resolve_backend
from .experts.activation import Activation
from .experts.backends import choose_backend
from .experts.store import ExpertStore, ResidentStore
from .grad_mode import records_grad
from .graphs import GraphCache
from .routing.types import refresh_router_cast

CAPACITY_MODES = ("model", "none")


def _stream_capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s CUDA stream is capturing a graph (never on CPU, where the query would raise)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class OptimizedMoE(nn.Module):
    """Dynamic-gating replacement for one sparse MoE block.

    Args:
        block: the HF sparse MLP being replaced (kept for :func:`hf_moe_opt.restore`).
        weights: the block's expert weights, stacked in place.
        activation: the experts' activation.
        route: ``route(router, hidden_states, padding_mask) -> Routing``; calls ``router`` so that
            hooks on it fire.
        out_scale: constant factor on every expert output (NLLB-MoE's eval token-dropout scaling).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        family: a short name for messages and ``repr``.
        cuda_graphs: replay the routed part (dispatch, experts, combine) from CUDA graphs captured per
            input shape, for small token counts on CUDA (decode steps). See :mod:`hf_moe_opt.graphs`.
    """

    def __init__(
        self,
        block: nn.Module,
        weights: ExpertWeights,
        activation: Activation,
        route: Callable,
        *,
        out_scale: float = 1.0,
        backend: str = "auto",
        family: str = "",
        cuda_graphs: bool = False,
    ):
        super().__init__()
        self.router = block.router
        self.experts = block.experts
        # A tuple hides the original block from nn.Module registration: no duplicate state_dict keys.
        self._original = (block,)
        self.weights = weights
        self.store: ExpertStore = ResidentStore(weights)
        self.activation = activation
        self.route = route
        self.out_scale = float(out_scale)
        self.backend = backend
        self.family = family
        self._resolved: dict[torch.device, str] = {}
        # Callables ``fn(layer, routing)`` run after routing (the routing profiler uses this).
        self.observers: list[Callable] = []
        # Fail early on a bad option, judged on the compute device: the router's (dense weights'),
        # which differs from the experts' when they are served from host memory (expert_cache).
        router_params = list(self.router.parameters()) if isinstance(self.router, nn.Module) else []
        resolve_backend(backend, router_params[0].device if router_params else weights.device)
        self.train(block.training)
        self.graphs = GraphCache() if cuda_graphs else None
        # Stores that keep copies of expert weights (cache slots, placed copies) take them again after a
        # load_state_dict through this layer or a module above it, or straight into its expert modules.
        self.register_load_state_dict_post_hook(_weights_loaded)
        experts = self.experts.modules() if isinstance(self.experts, nn.Module) else ()
        self._expert_load_hooks = [m.register_load_state_dict_post_hook(_ExpertsLoaded(self)) for m in experts]

    def __setstate__(self, state: dict) -> None:
        # An optimized model unpickled in another process: if it was fused (fuse_dense=True), its
        # configs name our attention implementation, which that process has not registered yet.
        super().__setstate__(state)
        from .dense.attention import register

        register()

    def expert_weights_changed(self) -> None:
        """The expert parameters were written in place: copies of them (expert-cache slots, the
        per-device copies of a placement) are taken again before the next call. ``load_state_dict``
        calls this by itself; see :func:`hf_moe_opt.sync_expert_copies` for other in-place edits."""
        hook = getattr(self.store, "weights_changed", None)
        if callable(hook):
            stacks = self._stack_key()
            hook()
            if self.graphs is not None and self._stack_key() != stacks:
                self.graphs.clear()  # they read the old stacks
        refresh_router_cast_of(self.router, force=True)  # a write through .data moves no version counter

    def _stack_key(self) -> tuple:
        return tuple(s.tensor.data_ptr() for s in self.weights.stacks())

    @property
    def original_block(self) -> nn.Module:
        return self._original[0]

    @property
    def num_experts(self) -> int:
        return self.weights.num_experts

    def extra_repr(self) -> str:
        w1 = self.weights.w1.tensor
        return (
            f"family={self.family}, num_experts={w1.shape[0]}, d_model={w1.shape[2]}, d_ff={w1.shape[1]}, "
            f"activation={self.activation.name}, backend={self.backend}"
        )

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() give every parameter a new storage: stack them again into one.
        result = super()._apply(fn, recurse)
        self.store.refresh()
        self._resolved.clear()
        if self.graphs is not None:
            self.graphs.clear()  # captured graphs point at the old weights
        return result

    def _backend_name(self, device: torch.device) -> str:
        # Per device: "torch", "triton" or "auto" (torch or Triton per call, experts.backends.auto_moe_ffn).
        name = self._resolved.get(device)
        if name is None:
            name = self._resolved[device] = choose_backend(self.backend, device, 0)
        return name

    def _ffn(self, device: torch.device, rows: int) -> Callable:
        return get_backend(self._backend_name(device))

    # torch.compile (a user's, or transformers' own for static-cache generate) runs this layer as it is,
    # between compiled graphs: its host-side routing decisions, Triton launches and probes do not trace.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            raise RuntimeError(
                "hf_moe_opt layers run inference only: call model.eval(), or hf_moe_opt.restore(model) to train"
            )
        if torch.is_grad_enabled() and not _GRAD_WARNED:
            _warn_no_expert_grads(self)
        if not self.store.capturable and _stream_capturing(hidden_states):
            # Otherwise the store's host read fails deep inside with a bare CUDA capture error.
            raise RuntimeError(
                f"{type(self.store).__name__} reads the routing on the host and cannot run inside a CUDA-graph "
                "capture; for continuous batching build the config with "
                "hf_moe_opt.integrations.continuous_batching_config(model) (or use_cuda_graph=False)"
            )
        shape = hidden_states.shape
        if hidden_states.dim() == 2:  # [tokens, hidden] (DeepSeek's blocks take it): one sequence
            hidden_states = hidden_states.unsqueeze(0)
        elif hidden_states.dim() != 3:
            raise ValueError(
                f"{type(self).__name__} takes [batch, seq, hidden] or [tokens, hidden] hidden states, "
                f"got shape {tuple(shape)}"
            )
        hidden = shape[-1]
        routing = self.route(self.router, hidden_states, padding_mask)
        for observer in self.observers:
            observer(self, routing)
        x = hidden_states.reshape(-1, hidden)
        if self.graphs is not None and isinstance(self.store, ResidentStore) and not records_grad(x, routing.gates):
            out = self.graphs.run(self._compute, x, *routing)
        else:
            out = self._compute(x, *routing)
        return out.view(shape)

    def _compute(self, x, expert_index, gates, keep) -> torch.Tensor:
        """Dispatch, experts and combine for routed tokens ``x`` ``[N, D]``."""
        backend, ffn_for = self._backend_name(x.device), self._ffn
        if backend != "torch" and records_grad(x, gates):
            # The Triton kernels have no backward: torch's ops carry gradients to the inputs and router.
            backend, ffn_for = "torch", _torch_ffn
        return self.store.run_routed(x, expert_index, gates, keep, backend, ffn_for, self.activation, self.out_scale)


def _torch_ffn(device: torch.device, rows: int) -> Callable:
    return get_backend("torch")


def refresh_router_cast_of(router: object, force: bool = False) -> None:
    """Bring the float32 copy of ``router``'s classifier (kept by ``router_logits``) up to date."""
    classifier = getattr(router, "classifier", None)
    if isinstance(classifier, nn.Module):
        refresh_router_cast(classifier, force=force)


_GRAD_WARNED = False


def _warn_no_expert_grads(layer: OptimizedMoE) -> None:
    """Once per process: a forward with gradients on computes none for the experts' weights."""
    global _GRAD_WARNED
    if any(p.requires_grad for p in layer.parameters()):
        _GRAD_WARNED = True
        warnings.warn(
            "hf_moe_opt layers compute no gradients for expert weights (outputs and input gradients are "
            "exact); run inference under torch.no_grad() or torch.inference_mode() (which is also faster), "
            "or hf_moe_opt.restore(model) to fine-tune the experts",
            UserWarning,
            stacklevel=3,
        )


class _ExpertsLoaded:
    """``load_state_dict`` post-hook of the layer's expert modules: a load straight into them writes the
    expert weights as a load through the layer does (a class, not a closure: models stay picklable)."""

    def __init__(self, layer: OptimizedMoE) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        _weights_loaded(self.layer, incompatible_keys)


def remove_expert_load_hooks(layer: OptimizedMoE) -> None:
    """Take the layer's hooks off its expert modules (``restore`` hands them back to the HF block)."""
    for handle in getattr(layer, "_expert_load_hooks", ()):
        handle.remove()
    layer._expert_load_hooks = []


def _weights_loaded(module: OptimizedMoE, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the loaded values went into the parameters in place.

    ``load_state_dict(..., assign=True)`` instead puts new parameter objects into the modules, which
    the layer's stacked experts and its store do not hold: it would go on computing with the old
    weights, so that is an error with the way out. Every module's hooks of one load share its list of
    missing keys: the layer acts once per load, however many of its modules the load went through."""
    keys = getattr(incompatible_keys, "missing_keys", None)
    if keys is not None:
        if module.__dict__.get("_last_load") is keys:
            return
        module.__dict__["_last_load"] = keys
    registered = {id(p) for p in module.parameters()}
    for stack in module.weights.stacks():
        params = stack.params() if callable(stack.params) else stack.params
        if any(id(p) not in registered for p in params):
            raise RuntimeError(
                "load_state_dict(..., assign=True) replaced expert parameters of an hf_moe_opt layer, which "
                "would keep computing with the old ones: load without assign=True, or call "
                "hf_moe_opt.restore(model), load, then optimize again"
            )
    module.expert_weights_changed()
