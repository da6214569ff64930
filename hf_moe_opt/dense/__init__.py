"""The dense parts of an MoE model, fused: attention through SDPA with the bias in its mask, one-pass RMS norms.

``optimize(model, fuse_dense=True)`` calls :func:`fuse_dense`; ``restore`` calls :func:`unfuse_dense`.
Once the expert layers are fast, a Switch or NLLB-MoE encoder spends most of its time in
transformers' eager attention and float32 norm arithmetic (at batch 128 x 128 tokens, 15 of the
18 ms of an optimized switch-base-128 encoder). Outputs agree with the eager modules to rounding
(float32 softmax in one kernel, another float32 summation order), not bit for bit; that is why
this is opt-in.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .attention import ATTENTION_NAME, register

__all__ = ["ATTENTION_NAME", "DENSE_MODEL_TYPES", "fuse_dense", "unfuse_dense"]

# Model types whose attention takes its bias through transformers' AttentionInterface.
DENSE_MODEL_TYPES = ("switch_transformers", "nllb-moe")
# Norm classes with T5's arithmetic (float32 statistics, no mean subtraction, no bias).
_T5_NORMS = ("SwitchTransformersLayerNorm",)
_SAVED_ATTN = "_hf_moe_opt_saved_attn_implementation"


class FusedNormForward:
    """A T5-style norm's fused ``forward``, set on the module instance. A callable object rather than a
    bound function, which pickles as a lookup of the function's name on the module and fails to load."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from .rms_norm import fused_forward

        return fused_forward(self.module, hidden_states)

    def __setstate__(self, state: dict) -> None:
        # A fused model loaded in another process: its configs name our attention implementation.
        self.__dict__.update(state)
        register()


def _configs(model: nn.Module) -> list:
    """Every config object the model's modules read ``_attn_implementation`` from (T5-style stacks
    hold deep copies of the model's config), each once."""
    found: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.setdefault(id(config), config)
    return list(found.values())


def fuse_dense(model: nn.Module) -> list[str]:
    """Fuse the dense parts of a supported model in place; returns what was fused (``"attention"``,
    ``"rms_norm"``), empty when nothing applies (another family: its modules are left as they are)."""
    done = []
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) in DENSE_MODEL_TYPES:
        register()
        if not hasattr(model, _SAVED_ATTN):
            setattr(model, _SAVED_ATTN, [(c, c._attn_implementation) for c in _configs(model)])
        for c, _ in getattr(model, _SAVED_ATTN):
            c._attn_implementation = ATTENTION_NAME
        done.append("attention")
    norms = 0
    if importlib.util.find_spec("triton") is not None:  # the norm kernel is Triton (an optional extra)
        for module in model.modules():
            if type(module).__name__ in _T5_NORMS and "forward" not in module.__dict__:
                module.forward = FusedNormForward(module)
                norms += 1
    if norms:
        done.append("rms_norm")
    return done


def unfuse_dense(model: nn.Module) -> None:
    """Undo :func:`fuse_dense` (nothing happens where it did not apply)."""
    for c, impl in getattr(model, _SAVED_ATTN, []):
        c._attn_implementation = impl
    if hasattr(model, _SAVED_ATTN):
        delattr(model, _SAVED_ATTN)
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedNormForward):
            del module.forward
