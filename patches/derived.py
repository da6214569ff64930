"""Families whose sparse MoE block is another family's code under new class names.

transformers generates many models from others ("modular" files), so GLM-4.5's MoE block, router and
experts are DeepSeek-V3's line for line, MiniMax's are Mixtral's, Qwen3-Next's block is Qwen2-MoE's,
and so on. Each family here names the family it copies and reuses that family's layer and routing.

Copied code can drift: a later transformers may change one family and not the other. So before a
family's blocks are matched, the installed transformers' forwards (and other methods) of its block,
router and experts are compared with the copied family's -- bytecode, names, constants and the
globals they use. Where anything differs the family is not matched: ``optimize`` names its blocks as
unsupported, with the reason, instead of running routing that may have changed.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

from torch import nn

from .fused import FusedMoEPatch, SoftmaxTopKRouting, hf_class


def _code_key(code: types.CodeType, doc: str | None = None) -> tuple:
    consts = tuple(
        _code_key(c) if isinstance(c, types.CodeType) else (type(c).__name__, c)
        for c in code.co_consts
        if not (doc is not None and isinstance(c, str) and c == doc)
    )
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, consts)


def same_code(a: Callable, b: Callable, _depth: int = 0) -> bool:
    """Whether two functions do the same thing by construction: equal bytecode, names and constants
    (docstrings and line numbers aside), and every global they read is the same object in both
    modules, or a function for which this holds in turn."""
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_b is None:
        return a is b
    if _code_key(code_a, a.__doc__) != _code_key(code_b, b.__doc__):
        return False
    missing = object()
    for name in _all_names(code_a):
        ga, gb = a.__globals__.get(name, missing), b.__globals__.get(name, missing)
        if ga is gb:
            continue
        if _depth < 3 and isinstance(ga, types.FunctionType) and isinstance(gb, types.FunctionType):
            if same_code(ga, gb, _depth + 1):
                continue
        return False
    return True


def _all_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _all_names(c)
    return names


def _methods(cls: type) -> dict[str, Callable]:
    """The functions ``cls`` and its bases up to ``nn.Module`` define, ``__init__`` aside (it only
    stores the config's values under the names the other methods read)."""
    found: dict[str, Callable] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, nn.Module):
            continue
        for name, value in vars(klass).items():
            if name != "__init__" and isinstance(value, types.FunctionType):
                found[name] = value
    return found


def same_class_code(a: type, b: type) -> bool:
    """Whether classes ``a`` and ``b`` define the same methods (``__init__`` aside) with the same code."""
    ma, mb = _methods(a), _methods(b)
    return ma.keys() == mb.keys() and all(same_code(ma[k], mb[k]) for k in ma)


class DerivedPatch(FusedMoEPatch):
    """A family whose block (and experts, and router unless ``routing`` is given) copy ``base``'s.

    Args:
        base: the patch of the copied family; its layer class and settings are reused.
        base_experts: the class name of the copied family's experts.
        model_type, module, block, router, experts: the family's ``config.model_type``, modeling
            module name under ``transformers.models`` and class names.
        routing: ``(mixin, attributes)`` of a router forward for a family whose router is its own
            (checked by tests against transformers only); None: the base's routing, after the
            installed router's code is found equal to the base router's.
        other_experts: ``(patch, experts class name)`` of other families whose experts this family's
            may copy instead (a family whose experts changed between transformers releases); a
            block's experts then run with the activation of the family whose code they match.
    """

    def __init__(
        self,
        base: FusedMoEPatch,
        base_experts: str,
        model_type: str,
        module: str,
        block: str,
        router: str,
        experts: str,
        routing: tuple[type, dict] | None = None,
        other_experts: tuple[tuple[FusedMoEPatch, str], ...] = (),
    ):
        self.base = base
        self.base_experts_class_name = base_experts
        self.experts_sources = ((base, base_experts), *other_experts)
        self.model_type = model_type
        self.module_path = f"transformers.models.{module}.modeling_{module}"
        self.block_class_name = block
        self.router_class_name = router
        self.experts_class_name = experts
        self.routing = routing
        self.router_name = base.router_name
        self.transposed = base.transposed
        self.returns_router_scores = base.returns_router_scores
        self.layer_class = base.layer_class
        self.route_function = base.route_function

    def activation(self, block: nn.Module, config):
        return _experts_source(self, type(block.experts)).activation(block, config)

    def check_block(self, block: nn.Module) -> None:
        self.base.check_block(block)

    def _hf(self, name: str) -> type | None:
        return hf_class(self.module_path, name)

    def mismatch(self) -> str | None:
        """Why the installed transformers' code of this family is not the copied family's, or None
        when it is (or when transformers lacks either family)."""
        return _mismatch(self)

    def block_class(self) -> type[nn.Module] | None:
        cls = super().block_class()
        return None if cls is None or self.mismatch() is not None else cls

    @property
    def router_class(self) -> type[nn.Module] | None:  # type: ignore[override]
        return _router_class(self)


@functools.cache
def _mismatch(patch: DerivedPatch) -> str | None:
    base = patch.base
    pairs = [(patch.block_class_name, base.block_class_name, base.module_path)]
    base_router = base.router_class
    if patch.routing is None and base_router is not None:
        hf_router = next(c for c in base_router.__mro__ if c.__module__.startswith("transformers."))
        pairs.append((patch.router_class_name, hf_router.__name__, hf_router.__module__))
    for ours, theirs, theirs_module in pairs:
        a, b = patch._hf(ours), hf_class(theirs_module, theirs)
        if a is None or b is None:
            return None  # the family (or the copied one) is missing: block_class() says so
        if not same_class_code(a, b):
            return f"its {ours} code differs from {theirs}'s, which {patch.model_type} copied when this was written"
    experts = patch._hf(patch.experts_class_name)
    sources = [hf_class(p.module_path, name) for p, name in patch.experts_sources]
    if experts is None or all(cls is None for cls in sources):
        return None
    if not any(cls is not None and same_class_code(experts, cls) for cls in sources):
        names = " or ".join(f"{name}'s" for _, name in patch.experts_sources)
        return (
            f"its {patch.experts_class_name} code differs from {names}, "
            f"which {patch.model_type} copied when this was written"
        )
    return None


@functools.cache
def _experts_source(patch: DerivedPatch, experts: type) -> FusedMoEPatch:
    """The family whose experts code ``experts`` has (the base when none matches)."""
    for source, name in patch.experts_sources:
        cls = hf_class(source.module_path, name)
        if cls is not None and same_class_code(experts, cls):
            return source
    return patch.base


@functools.cache
def _router_class(patch: DerivedPatch) -> type[nn.Module] | None:
    hf_router = patch._hf(patch.router_class_name)
    if hf_router is None:
        return None
    if patch.routing is not None:
        mixins, attributes = (patch.routing[0],), dict(patch.routing[1])
    else:
        base_router = patch.base.router_class
        if base_router is None:
            return None
        mixins = tuple(c for c in base_router.__bases__ if not c.__module__.startswith("transformers."))
        attributes = {k: v for k, v in vars(base_router).items() if not k.startswith("__")}
    name = f"Optimized{hf_router.__name__}"
    existing = globals().get(name)
    if isinstance(existing, type) and issubclass(existing, hf_router):
        return existing  # one class per name, whichever patch instance asks
    attributes.update(__module__=__name__, __qualname__=name, __doc__=f"{hf_router.__name__} with our routing.")
    cls = type(name, (*mixins, hf_router), attributes)
    globals()[name] = cls  # importable by name, so a pickled model finds it
    return cls


def __getattr__(name: str) -> type:
    # A model pickled in another process names its routers' classes here: build them on demand.
    for patch in derived_patches():
        if name == f"Optimized{patch.router_class_name}" and patch.router_class is not None:
            return patch.router_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PARTS = ("SparseMoeBlock", "TopKRouter", "Experts")


def derived_patches() -> list[DerivedPatch]:
    """The families this module adds, in the registry's order."""
    from .deepseek_v2 import DeepseekV2Patch
    from .deepseek_v3 import DeepseekV3Patch, DeepseekV3Routing
    from .granitemoe import GraniteMoePatch
    from .hy_v4 import HYV4Patch
    from .inkling2 import Inkling2Patch
    from .kolibri1 import Kolibri1Patch
    from .mixtral import MixtralPatch
    from .olmoe import OlmoePatch
    from .qwen2_moe import Qwen2MoePatch
    from .qwen3_moe import Qwen3MoePatch
    from .step3p7 import Step3p7Patch

    mixtral = (MixtralPatch(), "MixtralExperts")
    qwen2 = (Qwen2MoePatch(), "Qwen2MoeExperts")
    qwen3 = (Qwen3MoePatch(), "Qwen3MoeExperts")
    olmoe = (OlmoePatch(), "OlmoeExperts")
    v2 = (DeepseekV2Patch(), "DeepseekV2Experts")
    v3 = (DeepseekV3Patch(), "DeepseekV3Experts")
    granite = (GraniteMoePatch(), "GraniteMoeExperts")
    hy_v4 = (HYV4Patch(), "HYV4Experts")
    kolibri1 = (Kolibri1Patch(), "Kolibri1Experts")
    inkling2 = (Inkling2Patch(), "Inkling2Experts")
    # Bailing hybrid's experts are DeepSeek-V3's up to transformers 5.24, Step-3.7's (limits after the
    # activation) from 5.25 on.
    bailing = {"other_experts": ((Step3p7Patch(), "Step3p7Experts"),)}
    # MiniCPM5-MoE's router is DeepSeek-V3's with autocast turned off around its float32 logits.
    fp32_v3 = (DeepseekV3Routing, {"autocast_off": True})
    # Qwen3.5-MoE and Qwen3-VL-MoE route as Qwen3-MoE with the weights always renormalised.
    renormalized = (SoftmaxTopKRouting, {"normalize_always": True})
    families = [
        (mixtral, "minimax", "MiniMaxSparseMoeBlock", "MiniMaxTopKRouter", "MiniMaxExperts", None),
        (qwen2, "qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextTopKRouter", "Qwen3NextExperts", None),
        (qwen2, "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "Qwen3_5MoeTopKRouter", "Qwen3_5MoeExperts", renormalized),
        (
            qwen3,
            "qwen3_vl_moe",
            "Qwen3VLMoeTextSparseMoeBlock",
            "Qwen3VLMoeTextTopKRouter",
            "Qwen3VLMoeTextExperts",
            renormalized,
        ),
        (olmoe, "flex_olmo", "FlexOlmoSparseMoeBlock", "FlexOlmoTopKRouter", "FlexOlmoExperts", None),
        (v3, "glm4_moe", "Glm4MoeMoE", "Glm4MoeTopkRouter", "Glm4MoeExperts", None),
        (v3, "glm4_moe_lite", "Glm4MoeLiteMoE", "Glm4MoeLiteTopkRouter", "Glm4MoeLiteExperts", None),
        (v3, "dots1", "Dots1MoE", "Dots1TopkRouter", "Dots1Experts", None),
        (v3, "deepseek_v32", "DeepseekV32MoE", "DeepseekV32TopkRouter", "DeepseekV32Experts", None),
        (v3, "solar_open", "SolarOpenMoE", "SolarOpenTopkRouter", "SolarOpenExperts", None),
        (v3, "exaone_moe", "ExaoneMoeSparseMoEBlock", "ExaoneMoeTopkRouter", "ExaoneMoeExperts", None),
        (v3, "kimi_linear", "KimiLinearMoE", "KimiLinearTopkRouter", "KimiLinearExperts", None),
        (v3, "glm_moe_dsa", "GlmMoeDsaMoE", "GlmMoeDsaTopkRouter", "GlmMoeDsaExperts", None),
        (v3, "glm4v_moe", "Glm4vMoeTextMoE", "Glm4vMoeTextTopkRouter", "Glm4vMoeTextExperts", None),
        (v3, "bailing_hybrid", *(f"BailingHybrid{part}" for part in ("MoE", "TopkRouter", "Experts")), None, bailing),
        (v3, "minicpm5_moe", "MiniCPM5MoeMoE", "MiniCPM5MoeTopkRouter", "MiniCPM5MoeExperts", fp32_v3),
        (v3, "dots3_note", "Dots3NoteTextMoE", "Dots3NoteTextTopkRouter", "Dots3NoteExperts", None),
        (qwen3, "mellum", "MellumSparseMoeBlock", "MellumTopKRouter", "MellumExperts", None),
        # OCR models around a DeepSeek-V2 language model (V2's topk_method check comes with the base).
        (v2, "deepseek_ocr2", "DeepseekOcr2TextMoe", "DeepseekOcr2TextTopkRouter", "DeepseekOcr2TextExperts", None),
        (v2, "unlimited_ocr", "UnlimitedOcrTextMoe", "UnlimitedOcrTextTopkRouter", "UnlimitedOcrTextExperts", None),
        # HY-V4's limited-SwiGLU experts under DeepSeek-V3's block and router.
        (hy_v4, "glm5_next", "Glm5NextTextMoE", "Glm5NextTextTopkRouter", "Glm5NextTextExperts", None),
        (hy_v4, "hy_v4_vl", "HYV4VLMoE", "HYV4VLTopkRouter", "HYV4VLExperts", None),
        (kolibri1, "kolibri1_1", "Kolibri1_1SparseMoeBlock", "Kolibri1_1TopKRouter", "Kolibri1_1Experts", None),
        (inkling2, "inkling2_loop", *(f"Inkling2Loop{part}" for part in _PARTS), None),
        # Qwen3-Omni-MoE: the thinker's blocks are Qwen3-MoE's, the talker's Qwen2-MoE's (shared expert).
        (qwen3, "qwen3_omni_moe", *(f"Qwen3OmniMoeThinkerText{part}" for part in _PARTS), None),
        (qwen2, "qwen3_omni_moe_talker", *(f"Qwen3OmniMoeTalkerText{part}" for part in _PARTS), None),
        (qwen2, "qwen4_exp", "Qwen4ExpTextSparseMoeBlock", "Qwen4ExpTextTopKRouter", "Qwen4ExpTextExperts", None),
        *(
            (granite, model_type, f"{prefix}MoE", f"{prefix}TopKRouter", f"{prefix}Experts", None)
            for model_type, prefix in [
                ("granitemoeshared", "GraniteMoeShared"),
                ("granitemoehybrid", "GraniteMoeHybrid"),  # Granite 4.0
                ("granitemoe_swa", "GraniteMoeSWA"),
            ]
        ),
    ]
    # The model type names the modeling module, but for the Qwen3-Omni talker (two families in one module).
    patches = []
    for (base, experts_of_base), model_type, block, router, experts, routing, *options in families:
        module = model_type.removesuffix("_talker")
        kwargs = options[0] if options else {}
        classes = (block, router, experts)
        patches.append(DerivedPatch(base, experts_of_base, model_type, module, *classes, routing, **kwargs))
    return patches
