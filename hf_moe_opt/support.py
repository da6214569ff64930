"""Whether hf_moe_opt handles a model, from its config alone.

The model is built on the meta device (no weights read, no memory allocated), its sparse MoE blocks
are found as :func:`hf_moe_opt.optimize` finds them, and their experts are sized. Before downloading a
checkpoint a user learns which blocks would be replaced, which would not (and why), and how many
bytes the experts and the rest of the model take: what an ``expert_cache=`` budget is made of.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .cache.budget import _format_bytes, parse_bytes
from .experts.layout import expert_containers


@dataclass
class MoELayerInfo:
    """One sparse MoE block ``optimize`` would replace."""

    name: str
    block_class: str
    family: str
    num_experts: int
    expert_bytes: int  # one expert's weights in the report's dtype


@dataclass
class SupportReport:
    """What :func:`check_support` found; :meth:`summary` for people, :meth:`to_json` for tools."""

    model_type: str
    model_class: str
    dtype: str
    layers: list[MoELayerInfo] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (module name, why not replaced)
    total_bytes: int = 0
    gpu_bytes: int | None = None  # the memory --gpu-memory / gpu_memory= named, if any
    step_graphs: str | None = None  # why cuda_graphs="step" cannot capture this model; None: it can

    @property
    def supported(self) -> bool:
        """Every sparse MoE block of the model would be replaced (and there is at least one)."""
        return bool(self.layers) and not self.unmatched

    @property
    def expert_bytes(self) -> int:
        return sum(layer.num_experts * layer.expert_bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        """Everything but the replaced blocks' experts: what stays on the GPU under an expert cache."""
        return self.total_bytes - self.expert_bytes

    @property
    def resident_fraction(self) -> float | None:
        """The largest share of the experts that fits beside the dense weights in ``gpu_bytes``
        (weights only: activations, KV cache and the CUDA context need room too); None without it."""
        if self.gpu_bytes is None or not self.expert_bytes:
            return None
        return max(0.0, min(1.0, (self.gpu_bytes - self.dense_bytes) / self.expert_bytes))

    def summary(self) -> str:
        lines = [f"{self.model_class} ({self.model_type}), weights in {self.dtype}: {_format_bytes(self.total_bytes)}"]
        if self.layers:
            families = sorted({layer.family for layer in self.layers})
            experts = sorted({layer.num_experts for layer in self.layers})
            # Blocks of several expert widths (ERNIE 4.5 VL's text and vision experts) list each size.
            sizes = "/".join(_format_bytes(b) for b in sorted({layer.expert_bytes for layer in self.layers}))
            lines.append(
                f"  {len(self.layers)} sparse MoE blocks optimize() replaces ({', '.join(families)}; "
                f"{'/'.join(map(str, experts))} experts of {sizes} each)"
            )
            lines.append(
                f"  experts {_format_bytes(self.expert_bytes)}, everything else {_format_bytes(self.dense_bytes)}"
            )
        for name, why in self.unmatched:
            lines.append(f"  not replaced: {name}: {why}")
        if not self.layers and not self.unmatched:
            lines.append("  no sparse MoE block found")
        fraction = self.resident_fraction
        if fraction is not None:
            gpu = _format_bytes(self.gpu_bytes)
            if self.total_bytes <= self.gpu_bytes:
                lines.append(f"  fits whole in {gpu} (weights only)")
            elif fraction <= 0:
                lines.append(f"  does not fit in {gpu}: the weights outside the experts alone take more")
            else:
                budget = _format_bytes(fraction * self.expert_bytes)
                lines.append(
                    f"  in {gpu}: about {fraction:.0%} of the experts fit beside the rest (weights only): "
                    f"expert_cache= up to {budget!r}, less to leave room for activations and the KV cache"
                )
        if self.layers:
            why = self.step_graphs
            lines.append('  cuda_graphs="step": ' + ("available" if why is None else f"not available ({why})"))
        lines.append("  supported" if self.supported else "  NOT fully supported")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            supported=self.supported,
            expert_bytes=self.expert_bytes,
            dense_bytes=self.dense_bytes,
            resident_fraction=self.resident_fraction,
        )
        return out


def _meta_model(config) -> nn.Module:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    classes = [AutoModelForSeq2SeqLM] if getattr(config, "is_encoder_decoder", False) else [AutoModelForCausalLM]
    # A vision-language model: its generating class (what its checkpoints hold; some, Llama 4's, have
    # a causal-LM class too, which builds the text model alone), else the bare model.
    vision_text = getattr(transformers, "AutoModelForImageTextToText", None)
    if vision_text is not None and getattr(config, "vision_config", None) is not None:
        classes.insert(0, vision_text)
    classes += [c for c in (vision_text, AutoModel) if c is not None]
    last: Exception | None = None
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except ValueError as e:  # this auto class does not know the config
            last = e
    raise ValueError(f"transformers cannot build a model from this config ({last})")


def _experts(block: nn.Module) -> tuple[int, int]:
    """``(experts, parameter elements of all of them)`` of a sparse block's expert containers: fused
    ``[E, ...]`` parameters, or one child module per expert."""
    containers = [module for _, module in expert_containers(block)]  # JetMoE: two modules, no experts
    numel = sum(p.numel() for c in containers for p in c.parameters())
    fused = [p for c in containers for p in c.parameters(recurse=False) if p.dim() == 3]
    if fused:
        return fused[0].shape[0], numel
    # Per-expert children: those with weights (NLLB-MoE's experts module also holds a dropout).
    return sum(1 for c in containers[0].children() if next(c.parameters(), None) is not None), numel


def check_support(
    model: Any, *, dtype: torch.dtype = torch.bfloat16, gpu_memory: int | str | None = None
) -> SupportReport:
    """What ``optimize`` would do with a model, without its weights.

    Args:
        model: a transformers config, a model (its config is used), or what ``AutoConfig.from_pretrained``
            takes (a Hub name -- only ``config.json`` is fetched -- or a local folder).
        dtype: the weights' dtype for the byte counts.
        gpu_memory: bytes (or ``"80GiB"``) of one GPU: the report adds how much of the experts fits
            beside the rest of the weights.
    """
    from transformers import AutoConfig, PretrainedConfig

    from . import step_graphs
    from .api import _find_blocks
    from .patches import unmatched_moe_blocks

    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError("check_support needs a transformers model (with a .config), a config, or a name")
    elif isinstance(model, PretrainedConfig):
        config = model
    elif isinstance(model, str):
        config = AutoConfig.from_pretrained(model)
    else:
        raise TypeError(f"check_support expects a config, a model or a name, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gpu_bytes = parse_bytes(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if gpu_bytes is not None and gpu_bytes <= 0:
        raise ValueError(f"gpu_memory must be positive, got {gpu_memory!r}")
    meta = _meta_model(config)
    size = torch.empty((), dtype=dtype).element_size()
    report = SupportReport(
        model_type=getattr(config, "model_type", "?"),
        model_class=type(meta).__name__,
        dtype=str(dtype).removeprefix("torch."),
        total_bytes=sum(p.numel() for p in meta.parameters()) * size,
        gpu_bytes=gpu_bytes,
    )
    for name, _, _, block, patch in _find_blocks(meta):
        count, numel = _experts(block)
        report.layers.append(MoELayerInfo(name, type(block).__name__, patch.model_type, count, numel * size // count))
    report.unmatched = list(unmatched_moe_blocks(meta))
    try:
        step_graphs.check_supported(meta)
    except ValueError as e:
        report.step_graphs = str(e).removeprefix('cuda_graphs="step": ')
    return report


def write_report(report: SupportReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2)
