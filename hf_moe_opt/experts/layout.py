"""How a sparse MoE block stores its experts, read from the HF block before it is optimized.

Budgets (``expert_cache="24GiB"``), placement checks and device maps need each layer's expert
count and the bytes of one expert before any layer is built, sometimes on a meta-device skeleton
or with the experts offloaded by accelerate (parameters on the meta device: shapes and dtypes are
still there). Three layouts exist:

* per-expert modules ``experts.expert_{j}`` (Switch Transformers, NLLB-MoE);
* fused ``[E, ...]`` parameters of the ``experts`` module (``gate_up_proj``, ``down_proj`` and
  GPT-OSS's biases), as transformers 5.x keeps Mixtral, Qwen, OLMoE, DeepSeek and GPT-OSS, or
  ``up_proj`` / ``down_proj`` for two-matrix experts (Nemotron-H);
* fused ``[E, ...]`` weights of two expert modules of the block itself, ``input_linear`` and
  ``output_linear`` (JetMoE, whose block has no ``experts`` module).

Shared experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) are siblings of
``experts``, so they count in neither: they are dense weights of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FUSED_PARAM_NAMES = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "down_proj", "down_proj_bias")
# The fused parameter that marks the layout (its first dimension is the expert count).
_FIRST_PARAMS = ("gate_up_proj", "up_proj")


def expert_modules(block: nn.Module) -> list[str]:
    """Names ``expert_{j}`` of a sparse block's per-expert modules, in expert order (empty if fused)."""
    experts = getattr(block, "experts", None)
    names = [] if experts is None else [n for n, _ in experts.named_children() if n.startswith("expert_")]
    return sorted(names, key=lambda n: int(n.split("_", 1)[1]))


def fused_expert_params(block: nn.Module) -> dict[str, nn.Parameter]:
    """The ``experts`` module's fused ``[E, ...]`` parameters by name (empty for other layouts)."""
    experts = getattr(block, "experts", None)
    if experts is None or not any(isinstance(getattr(experts, n, None), nn.Parameter) for n in _FIRST_PARAMS):
        return {}
    return {n: p for n, p in experts.named_parameters(recurse=False) if n in FUSED_PARAM_NAMES}


@dataclass(frozen=True)
class ExpertLayout:
    """``num_experts`` experts of ``expert_bytes`` each; ``fused``: stored as fused ``[E, ...]`` tensors."""

    num_experts: int
    expert_bytes: int
    fused: bool


def expert_layout(block: nn.Module, dtype_size: int | None = None) -> ExpertLayout | None:
    """The block's expert count and bytes per expert (weights and biases), or None for an unknown layout.

    ``dtype_size``: size floating-point weights as if they had this many bytes per element (the
    dtype a model will be loaded in); default their own.
    """

    def nbytes(p: nn.Parameter, numel: int) -> int:
        size = p.element_size() if dtype_size is None or not p.is_floating_point() else dtype_size
        return numel * size

    names = expert_modules(block)
    if names:
        first = block.experts.get_submodule(names[0])
        return ExpertLayout(len(names), sum(nbytes(p, p.numel()) for p in first.parameters()), False)
    fused = fused_expert_params(block)
    if not fused:
        return _parallel_experts_layout(block, nbytes)
    num_experts = next(fused[n] for n in _FIRST_PARAMS if n in fused).shape[0]
    return ExpertLayout(num_experts, sum(nbytes(p, p[0].numel()) for p in fused.values()), True)


def parallel_expert_params(block: nn.Module) -> dict[str, nn.Parameter]:
    """JetMoE's layout: ``[E, ...]`` weights of two expert modules of the block itself
    (``input_linear.weight``, ``output_linear.weight``); empty for other layouts."""
    names = ("input_linear", "output_linear")
    params = {f"{n}.weight": getattr(getattr(block, n, None), "weight", None) for n in names}
    if getattr(block, "experts", None) is not None or not all(
        isinstance(p, nn.Parameter) and p.dim() == 3 for p in params.values()
    ):
        return {}
    return params


def _parallel_experts_layout(block: nn.Module, nbytes) -> ExpertLayout | None:
    params = parallel_expert_params(block)
    if not params:
        return None
    num_experts = params["input_linear.weight"].shape[0]
    return ExpertLayout(num_experts, sum(nbytes(p, p[0].numel()) for p in params.values()), True)


def expert_containers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the block's children that hold its experts: ``experts``, or JetMoE's
    ``input_linear`` and ``output_linear``; empty for a block of neither layout."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.Module):
        return [("experts", experts)]
    return [(n.partition(".")[0], getattr(block, n.partition(".")[0])) for n in parallel_expert_params(block)]
