"""Routers on CUDA in fused Triton kernels instead of seven torch kernels.

The routers of :mod:`patches` ask :func:`try_fused_router` first: batches up to
:data:`hf_moe_opt.kernels.router.MAX_TOKENS` tokens take two launches (decode steps), larger ones a
single tiled launch that also skips torch's float32 copy of the tokens and its float32 GEMM. It
answers None (and the torch path runs) off CUDA, without Triton, for more than
:data:`~hf_moe_opt.kernels.router.MAX_EXPERTS` experts or :data:`~hf_moe_opt.kernels.router.MAX_TOP_K`
choices, when autograd needs the router's graph, or when ``HF_MOE_OPT_FUSED_ROUTER=0`` is set (a
switch for profiling and comparisons). Semantics, dtypes and precision:
:mod:`hf_moe_opt.kernels.router`.
"""

from __future__ import annotations

import functools
import os

import torch

from ..compiled_kernels import compiled_kernels
from ..grad_mode import records_grad

# Device types the fused router serves (tests add "cpu" to run it in Triton's interpreter).
DEVICE_TYPES = {"cuda"}


@functools.cache
def _kernels():
    """``hf_moe_opt.kernels.router`` when Triton compiles for a GPU here, else None."""
    return compiled_kernels("router")


def fused_router_enabled() -> bool:
    """False when ``HF_MOE_OPT_FUSED_ROUTER=0`` turns the fused router off."""
    return os.environ.get("HF_MOE_OPT_FUSED_ROUTER", "1") != "0"


def try_fused_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mode: str,
    top_k: int | None = None,
    logits_dtype: torch.dtype,
    gates_dtype: torch.dtype,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(logits [N, E], indices [N, k], gates [N, k])`` from the fused kernels, or None where they do not apply.

    ``x`` is ``[N, D]``; the other arguments are :func:`hf_moe_opt.kernels.router.fused_router`'s.
    """
    if x.device.type not in DEVICE_TYPES or not fused_router_enabled():
        return None
    kernels = _kernels()
    if kernels is None or records_grad(x, weight):
        return None
    k = kernels.FIXED_TOP_K.get(mode, top_k) or 0
    if not kernels.fits(x.shape[0], weight.shape[0], k):
        return None
    if not kernels.router_supported(x, weight, (logits_dtype, gates_dtype)):
        return None
    return kernels.fused_router(
        x, weight, bias, mode=mode, top_k=top_k, logits_dtype=logits_dtype, gates_dtype=gates_dtype, normalize=normalize
    )
