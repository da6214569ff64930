"""What a model-family patch provides: how to find its sparse MoE block and build the layer."""

from __future__ import annotations

import importlib
import types
from abc import ABC, abstractmethod

from torch import nn

from hf_moe_opt.layer import OptimizedMoE


class MoEPatch(ABC):
    """One HF architecture. Subclasses name the block class and build :class:`OptimizedMoE`."""

    #: ``config.model_type`` of the architecture.
    model_type: str
    #: module and class name of the HF sparse MoE block.
    module_path: str
    block_class_name: str

    def block_class(self) -> type[nn.Module] | None:
        """The HF block class, or None when the installed transformers lacks it."""
        try:
            module = importlib.import_module(self.module_path)
        except ImportError:
            return None
        return getattr(module, self.block_class_name, None)

    def matches(self, module: nn.Module) -> bool:
        cls = self.block_class()
        return cls is not None and type(module) is cls

    @abstractmethod
    def build(self, block: nn.Module, config, *, capacity: str, backend: str) -> OptimizedMoE:
        """Wrap ``block`` (its router and experts are reused, weights stacked in place)."""

    def restore(self, layer: OptimizedMoE) -> nn.Module:
        """Undo :meth:`build`; returns the original block."""
        undo_router_swap(layer.router)
        return layer.original_block


def undo_router_swap(module: nn.Module) -> None:
    """Give every submodule of ``module`` whose class :func:`swap_router_class` swapped its own class
    back (and drop the options stored on it); a no-op where nothing was swapped."""
    for sub in module.modules():
        original_class = getattr(sub, "_hf_moe_opt_original_class", None)
        if original_class is not None:
            ours = type(sub).forward
            sub.__class__ = original_class
            own = vars(sub)
            if "_hf_moe_opt_hooked_forward" in own and "_old_forward" in own:
                sub._old_forward = sub._hf_moe_opt_hooked_forward
            elif getattr(own.get("_old_forward"), "__func__", None) is ours:
                # A hook attached while optimized (dispatch_model, cpu_offload) bound our forward.
                sub._old_forward = types.MethodType(original_class.forward, sub)
            if getattr(own.get("forward"), "__func__", None) is ours:
                del sub.forward  # a hook removed while optimized pinned our forward on the instance
            for name in [n for n in vars(sub) if n.startswith("_hf_moe_opt_")]:
                delattr(sub, name)
        # The router's cached float32 weight (hf_moe_opt.routing.types) lives on its linear child.
        sub.__dict__.pop("_hf_moe_opt_router_cast", None)


def swap_router_class(router: nn.Module, optimized_class: type[nn.Module], **options) -> None:
    """Give the router our forward while keeping the object (and any hooks on it).

    transformers records router logits with forward hooks matched by router class; a subclass keeps
    ``isinstance`` true and the object keeps hooks already installed.
    """
    if not issubclass(optimized_class, type(router)):
        raise TypeError(f"{optimized_class.__name__} must subclass {type(router).__name__}")
    router._hf_moe_opt_original_class = type(router)
    for key, value in options.items():
        setattr(router, f"_hf_moe_opt_{key}", value)
    original_forward = type(router).forward
    router.__class__ = optimized_class
    own = vars(router)
    if "_old_forward" in own:
        # An accelerate hook (a model loaded with a device map over several devices or offloading) calls
        # the forward bound when it was attached, the original class's: it must call ours instead.
        router._hf_moe_opt_hooked_forward = router._old_forward
        router._old_forward = types.MethodType(optimized_class.forward, router)
    elif getattr(own.get("forward"), "__func__", None) is original_forward:
        del router.forward  # a removed hook leaves the original bound forward on the instance
