"""Per-architecture patches: one module per HF model family, and the registry that finds them."""

from __future__ import annotations

from torch import nn

from .base import MoEPatch
from .nllb_moe import NllbMoePatch
from .switch_transformers import SwitchTransformersPatch

_REGISTRY: list[MoEPatch] = [SwitchTransformersPatch(), NllbMoePatch()]


def register_patch(patch: MoEPatch) -> None:
    """Add support for another architecture."""
    if any(p.model_type == patch.model_type for p in _REGISTRY):
        raise ValueError(f"a patch for {patch.model_type!r} is already registered")
    _REGISTRY.append(patch)


def registered_patches() -> list[MoEPatch]:
    return list(_REGISTRY)


def find_patch(module: nn.Module) -> MoEPatch | None:
    """The patch whose sparse MoE block ``module`` is, if any."""
    for patch in _REGISTRY:
        if patch.matches(module):
            return patch
    return None


__all__ = ["MoEPatch", "find_patch", "register_patch", "registered_patches"]
