"""T5-style RMS norm in one pass: Switch Transformers' ``SwitchTransformersLayerNorm``.

The eager module casts the input to float32, squares it, takes the mean, adds epsilon, takes the
reciprocal square root, multiplies, casts back to the weight's dtype and multiplies by the weight:
seven passes over a ``[tokens, d_model]`` tensor, twice per layer. The kernel reads each row once
and writes it once, with the same arithmetic: float32 mean of squares, ``x * rsqrt(var + eps)`` in
float32, rounded to the weight's dtype, times the weight (rounded again), so it differs from the
eager module only by the order of the float32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grad_mode import records_grad
from ..kernels import kernels_interpreted
from ..kernels.launch import cdiv, launch, next_power_of_2

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows per program: a [ROWS, next_pow2(D)] tile in registers.
_ROWS = 4
_MAX_COLS = 8192


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, stride_x, stride_o, eps,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=1) / n_cols
    normed = (x * tl.math.rsqrt(var + eps)[:, None]).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = (normed.to(tl.float32) * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=mask)


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` runs the kernel for these tensors (else the eager module should run)."""
    if x.dtype != weight.dtype or x.dtype not in _DTYPES or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return False
    if x.shape[-1] > _MAX_COLS or x.stride(-1) != 1 or x.device != weight.device:
        return False
    if x.device.type == "cuda":
        return not kernels_interpreted()
    return x.device.type == "cpu" and kernels_interpreted()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2) + eps))`` as T5 computes it (float32 statistics), one pass.

    ``x`` and ``weight`` share a dtype (check :func:`rms_norm_supported` first)."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    flat = x.reshape(rows, cols)
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows:
        grid = (cdiv(rows, _ROWS),)
        launch(_rms_norm_kernel, grid, flat, weight, out, rows, cols, flat.stride(0), out.stride(0), float(eps),
                               BLOCK_N=next_power_of_2(cols), ROWS=_ROWS)  # fmt: skip
    return out.view(x.shape)


def t5_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The eager module's arithmetic, step by step (the tests' reference)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    normed = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        normed = normed.to(weight.dtype)
    return weight * normed


def fused_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A ``SwitchTransformersLayerNorm.forward`` that runs the kernel where it applies (not where
    autograd records: the kernel has no backward)."""
    if not records_grad(hidden_states, module.weight) and rms_norm_supported(hidden_states, module.weight):
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return type(module).forward(module, hidden_states)
