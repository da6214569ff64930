"""The public entry points: optimize, restore, is_optimized, supported_architectures."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .experts.backends import BACKENDS
from .layer import CAPACITY_MODES, OptimizedMoE

logger = logging.get_logger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _patches():
    from .patches import registered_patches

    return registered_patches()


def supported_architectures() -> dict[str, str]:
    """``{config.model_type: sparse MoE block class}`` for every architecture ``optimize`` handles."""
    return {p.model_type: p.block_class_name for p in _patches()}


def _find_blocks(model: nn.Module):
    from .patches import find_patch

    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            patch = find_patch(child)
            if patch is not None:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((name, parent, child_name, child, patch))
    return found


def _config_for(model: nn.Module, block_name: str):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot optimize {block_name}: the model has no `config` (pass a transformers model)")
    return config


def _check_block_weights(name: str, block: nn.Module) -> None:
    for pname, p in block.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"{name}.{pname} is on the meta device (not loaded, or offloaded by accelerate). "
                "Load the model's weights onto a real device before hf_moe_opt.optimize."
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}.{pname} has dtype {p.dtype}; hf_moe_opt supports float32, bfloat16 and float16 "
                "experts (quantized experts are not supported)"
            )
    if getattr(block, "_hf_hook", None) is not None or any(
        getattr(m, "_hf_hook", None) is not None for m in block.modules()
    ):
        raise ValueError(f"{name} carries accelerate offload hooks; load its experts onto one device before optimizing")


def optimize(model: nn.Module, *, capacity: str = "model", backend: str = "auto") -> nn.Module:
    """Replace every supported sparse MoE block of ``model`` in place with :class:`OptimizedMoE`.

    Args:
        model: a transformers model (Switch Transformers or NLLB-MoE) in eval mode.
        capacity: ``"model"`` reproduces the model's routing exactly, capacity drops included
            (NLLB-MoE with the correct semantics, not transformers 5.x's); ``"none"`` never drops
            a token (dynamic gating).
        backend: expert compute: ``"torch"`` (grouped GEMMs), ``"triton"`` (fused kernels, CUDA)
            or ``"auto"`` (the best available for the experts' device).

    Returns:
        ``model``, modified in place. Parameter names and values are unchanged.
    """
    if capacity not in CAPACITY_MODES:
        raise ValueError(f"unknown capacity {capacity!r}; choose one of {', '.join(map(repr, CAPACITY_MODES))}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if is_optimized(model):
        raise ValueError("this model is already optimized; call hf_moe_opt.restore(model) before optimizing again")
    blocks = _find_blocks(model)
    if not blocks:
        supported = ", ".join(f"{cls} ({mt})" for mt, cls in supported_architectures().items())
        raise ValueError(f"{type(model).__name__} has no supported sparse MoE block. Supported: {supported}")
    for name, _, _, block, _ in blocks:
        _check_block_weights(name, block)
    for name, parent, child_name, block, patch in blocks:
        layer = patch.build(block, _config_for(model, name), capacity=capacity, backend=backend)
        layer._hf_moe_opt_patch = patch
        setattr(parent, child_name, layer)
    logger.info(f"hf_moe_opt: optimized {len(blocks)} MoE blocks (capacity={capacity}, backend={backend})")
    return model


def optimized_layers(model: nn.Module) -> list[tuple[str, OptimizedMoE]]:
    """``(name, layer)`` for every optimized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OptimizedMoE)]


def is_optimized(model: nn.Module) -> bool:
    """Whether ``model`` holds optimized MoE layers."""
    return any(isinstance(m, OptimizedMoE) for m in model.modules())


def restore(model: nn.Module) -> nn.Module:
    """Put the original HF blocks back (same weights); returns ``model``."""
    targets = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, OptimizedMoE):
                targets.append((parent, child_name, child))
    if not targets:
        raise ValueError("this model is not optimized (no hf_moe_opt layers found)")
    for parent, child_name, layer in targets:
        setattr(parent, child_name, layer._hf_moe_opt_patch.restore(layer))
    return model
