"""Per-architecture patches: one module per HF model family, and the registry that finds them."""

from __future__ import annotations

from torch import nn

from hf_moe_opt.layer import OptimizedMoE

from .afmoe import AfmoePatch
from .aria import AriaPatch
from .axk1 import AXK1Patch
from .axk2 import AXK2Patch
from .base import MoEPatch
from .beam import BeamPatch
from .cohere2_moe import Cohere2MoePatch
from .deepseek_v2 import DeepseekV2Patch
from .deepseek_v3 import DeepseekV3Patch
from .deepseek_v4 import DeepseekV4Patch
from .derived import DerivedPatch, derived_patches
from .ergo import ErgoPatch
from .ernie4_5_moe import Ernie4_5_MoePatch
from .ernie4_5_vl_moe import Ernie4_5_VLMoePatch
from .flint import FlintPatch
from .gpt_oss import GptOssPatch
from .granitemoe import GraniteMoePatch
from .hunyuan_v1_moe import HunYuanMoEV1Patch
from .hy_v3 import HYV3Patch
from .hy_v4 import HYV4Patch
from .inkling import InklingPatch
from .inkling2 import Inkling2Patch
from .jamba import JambaPatch
from .jetmoe import JetMoePatch
from .kolibri1 import Kolibri1Patch
from .laguna import LagunaPatch
from .lara_mini import LaraMiniPatch
from .lfm2_moe import Lfm2MoePatch
from .llama4 import Llama4Patch
from .longcat_flash import LongcatFlashPatch
from .mimo_v2_flash import MiMoV2FlashPatch
from .minimax_m2 import MiniMaxM2Patch
from .minimax_m3_vl import MiniMaxM3VLPatch
from .mistral4 import Mistral4Patch, MistralLarge4Patch
from .mixtral import MixtralPatch
from .muse_spark import MuseSparkPatch
from .nemotron_h import NemotronHPatch
from .nllb_moe import NllbMoePatch
from .olmoe import OlmoePatch
from .openai_privacy_filter import OpenAIPrivacyFilterPatch
from .phimoe import PhimoePatch
from .qwen2_moe import Qwen2MoePatch
from .qwen3_moe import Qwen3MoePatch
from .step3p7 import Step3p7Patch
from .switch_transformers import SwitchTransformersPatch
from .zaya import ZayaPatch

_REGISTRY: list[MoEPatch] = [
    SwitchTransformersPatch(),
    NllbMoePatch(),
    MixtralPatch(),
    Qwen2MoePatch(),
    Qwen3MoePatch(),
    OlmoePatch(),
    DeepseekV2Patch(),
    DeepseekV3Patch(),
    DeepseekV4Patch(),
    GptOssPatch(),
    MiniMaxM2Patch(),
    Ernie4_5_MoePatch(),
    Ernie4_5_VLMoePatch(),
    GraniteMoePatch(),
    HunYuanMoEV1Patch(),
    Lfm2MoePatch(),
    Llama4Patch(),
    Mistral4Patch(),
    PhimoePatch(),
    Cohere2MoePatch(),
    JambaPatch(),
    NemotronHPatch(),
    AriaPatch(),
    MiMoV2FlashPatch(),
    AfmoePatch(),
    HYV3Patch(),
    HYV4Patch(),
    AXK2Patch(),
    Kolibri1Patch(),
    Step3p7Patch(),
    LagunaPatch(),
    LaraMiniPatch(),
    FlintPatch(),
    LongcatFlashPatch(),
    InklingPatch(),
    MiniMaxM3VLPatch(),
    BeamPatch(),
    OpenAIPrivacyFilterPatch(),
    AXK1Patch(),
    Inkling2Patch(),
    MuseSparkPatch(),
    ErgoPatch(),
    MistralLarge4Patch(),
    ZayaPatch(),
    JetMoePatch(),
    *derived_patches(),
]


# Patches by block class name: find_patch runs on every module of a model (thousands), and a name
# lookup rules out almost all of them before any patch is asked.
_BY_NAME: dict[str, list[MoEPatch]] = {}


def _by_name() -> dict[str, list[MoEPatch]]:
    if not _BY_NAME:
        for patch in _REGISTRY:
            _BY_NAME.setdefault(patch.block_class_name, []).append(patch)
    return _BY_NAME


def register_patch(patch: MoEPatch) -> None:
    """Add support for another architecture."""
    if any(p.model_type == patch.model_type for p in _REGISTRY):
        raise ValueError(f"a patch for {patch.model_type!r} is already registered")
    _REGISTRY.append(patch)
    _BY_NAME.clear()


def registered_patches() -> list[MoEPatch]:
    return list(_REGISTRY)


def find_patch(module: nn.Module) -> MoEPatch | None:
    """The patch whose sparse MoE block ``module`` is, if any."""
    for patch in _by_name().get(type(module).__name__, ()):
        if patch.matches(module):
            return patch
    return None


def unmatched_moe_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, reason)`` of every module of ``model`` that looks like a sparse MoE block but no patch
    matches: a subclass of a supported block (its forward may differ, so it is not replaced) or a
    module with ``experts`` and a ``gate`` / ``router`` child (another family's block). Modules inside
    a matched block or an optimized layer are not listed."""
    classes = [(p, p.block_class()) for p in _REGISTRY]
    found: list[tuple[str, str]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip) or not name:
            continue
        if find_patch(module) is not None or isinstance(module, OptimizedMoE):
            skip.append(name + ".")
            continue
        parent = next((c for _, c in classes if c is not None and isinstance(module, c)), None)
        children = dict(module.named_children())
        if parent is not None:
            reason = f"{type(module).__name__} subclasses the supported {parent.__name__}, which only matches exactly"
        elif (why := _copied_code_changed(module)) is not None:
            reason = f"{type(module).__name__} is not matched: {why}"
        elif "experts" in children and ("gate" in children or "router" in children):
            reason = f"{type(module).__name__} is not a supported block"
        else:
            continue
        found.append((name, reason))
        skip.append(name + ".")
    return found


def _copied_code_changed(module: nn.Module) -> str | None:
    """Why a block of a family copying another's code is not matched (see :mod:`.derived`), if so."""
    cls = type(module)
    for patch in _REGISTRY:
        if (
            isinstance(patch, DerivedPatch)
            and cls.__name__ == patch.block_class_name
            and cls.__module__ == patch.module_path
        ):
            return patch.mismatch()
    return None


__all__ = ["MoEPatch", "find_patch", "register_patch", "registered_patches", "unmatched_moe_blocks"]
