"""Per-architecture patches: one module per HF model family, and the registry that finds them."""

from __future__ import annotations

from torch import nn

from .base import MoEPatch
from .deepseek_v2 import DeepseekV2Patch
from .deepseek_v3 import DeepseekV3Patch
from .gpt_oss import GptOssPatch
from .mixtral import MixtralPatch
from .nllb_moe import NllbMoePatch
from .olmoe import OlmoePatch
from .qwen2_moe import Qwen2MoePatch
from .qwen3_moe import Qwen3MoePatch
from .switch_transformers import SwitchTransformersPatch

_REGISTRY: list[MoEPatch] = [
    SwitchTransformersPatch(),
    NllbMoePatch(),
    MixtralPatch(),
    Qwen2MoePatch(),
    Qwen3MoePatch(),
    OlmoePatch(),
    DeepseekV2Patch(),
    DeepseekV3Patch(),
    GptOssPatch(),
]


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
