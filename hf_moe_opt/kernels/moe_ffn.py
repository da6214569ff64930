"""Fused Triton expert compute over a dispatch plan (dynamic gating, no padding to a capacity).

Two kernels, both driven by the plan's rows sorted by expert:

* ``gather_gemm_act``: ``h[r] = act(x[token[r]] @ w1[e].T + b1[e])`` -- the gather of token rows is
  fused into GEMM1's loads, accumulation in fp32, ``h`` stored in ``w2``'s dtype.
* ``gemm_scatter``: ``dst[order[r]] = gate[r] * out_scale * (h[r] @ w2[e].T + b2[e])``. ``order`` is
  a permutation, so every destination row has exactly one writer: no atomics, deterministic.
  Dropped rows (after ``offsets[-1]``) write zeros. For ``top_k > 1`` the ``k`` slots of a token
  are then summed in a fixed order.

Tile scheduling needs no host sync: each program derives its expert and row range from
``plan.counts`` on the device (per-expert tile counts, a cumulative sum, a compare-and-count). The
grid is sized for the worst case (``cdiv(A, BLOCK_M)`` tiles plus one partial tile per non-empty
group), unused tiles exit at once, and tiles never straddle experts. With fixed shapes the whole
forward is capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import DispatchPlan
from ..experts.activation import Activation
from ..experts.torch_backend import torch_moe_ffn
from .launch_config import KernelConfig, get_configs

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # layout differs across triton versions; then assume compiled kernels
    InterpretedFunction = None

# Activation names of the model configs -> the kernel's constexpr name.
_KERNEL_ACTIVATION = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile_rows(pid_m, counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Group of tile ``pid_m`` and its row range ``[start, end)``.

    Groups are the experts, then the dropped rows as group ``num_experts``; a larger group means an
    unused tile of the worst-case grid.
    """
    idx = tl.arange(0, BLOCK_E)
    kept = tl.load(offsets_ptr + num_experts - 1).to(tl.int32)
    cnt = tl.load(counts_ptr + idx, mask=idx < num_experts, other=0).to(tl.int32)
    cnt = tl.where(idx == num_experts, num_rows - kept, cnt)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    # Groups that end at or before this tile precede it; their number is this tile's group.
    group = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(idx < group, tiles, 0), axis=0)
    is_expert = group < num_experts
    last = tl.minimum(group, num_experts - 1)
    end = tl.where(is_expert, tl.load(offsets_ptr + last).to(tl.int32), num_rows)
    size = tl.where(is_expert, tl.load(counts_ptr + last).to(tl.int32), num_rows - kept)
    start = end - size + (pid_m - first_tile) * BLOCK_M
    return group, start, end


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u), without a tanh intrinsic.
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _gather_gemm_act_kernel(
    x_ptr,
    token_ptr,
    counts_ptr,
    offsets_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    num_rows,
    num_experts,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_hm,
    stride_hn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, row_start, row_end = _tile_rows(pid_m, counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M, BLOCK_E)
    if group >= num_experts:  # dropped rows are never computed; unused tiles exit
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    tok = tl.load(token_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_base = w_ptr + group.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(w.dtype)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + group.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemm_scatter_kernel(
    h_ptr,
    order_ptr,
    gate_ptr,
    counts_ptr,
    offsets_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    out_scale,
    num_rows,
    num_experts,
    N,
    K,
    stride_hm,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, row_start, row_end = _tile_rows(pid_m, counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M, BLOCK_E)
    if group > num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_out = mask_m[:, None] & mask_n[None, :]
    dst = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    out_ptrs = out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on
    if group == num_experts:
        # Dropped assignments contribute nothing, but their slot must still be defined.
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=mask_out)
        return
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_base = w_ptr + group.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + group.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    gate = tl.load(gate_ptr + rows, mask=mask_m, other=0.0).to(tl.float32) * out_scale
    acc = acc * gate[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


# DOT_FP32: triton's interpreter multiplies bf16 tiles as raw uint16 bits and fp16 tiles in fp16, so
# there the operands are widened first (exact: products of 16-bit floats are exact in fp32). Compiled
# kernels keep 16-bit tensor-core dots with fp32 accumulation.


def _dot_precision(dtype: torch.dtype) -> str | None:
    # Match torch: fp32 matmuls use TF32 only where torch is told to.
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _tile_grid_m(num_rows: int, num_experts: int, block_m: int) -> int:
    # Every non-empty group (experts + dropped rows) can add one partial tile.
    return triton.cdiv(num_rows, block_m) + min(num_experts + 1, num_rows)


def _block_e(num_experts: int) -> int:
    return max(triton.next_power_of_2(num_experts + 1), 2)


def gather_gemm_act(
    x: torch.Tensor,
    plan: DispatchPlan,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    activation: str,
    h: torch.Tensor,
    config: KernelConfig,
) -> torch.Tensor:
    """Kernel A into ``h`` ([A, F]): ``act(x[plan.token] @ w1[e].T + b1[e])`` for the kept rows.

    ``activation`` is a kernel name (``relu``, ``gelu``, ``gelu_tanh``, ``silu``). Rows of dropped
    assignments are left unwritten.
    """
    num_rows, num_experts = plan.num_rows, plan.num_experts
    ffn, hidden = w1.shape[1], w1.shape[2]
    bias = b1 if b1 is not None else w1  # placeholder pointer, never read
    grid = (_tile_grid_m(num_rows, num_experts, config.block_m), triton.cdiv(ffn, config.block_n))
    _gather_gemm_act_kernel[grid](
        x,
        plan.token,
        plan.counts,
        plan.offsets,
        w1,
        bias,
        h,
        num_rows,
        num_experts,
        ffn,
        hidden,
        x.stride(0),
        x.stride(1),
        w1.stride(0),
        w1.stride(1),
        w1.stride(2),
        b1.stride(0) if b1 is not None else 0,
        b1.stride(1) if b1 is not None else 0,
        h.stride(0),
        h.stride(1),
        HAS_BIAS=b1 is not None,
        ACTIVATION=activation,
        DOT_PRECISION=_dot_precision(w1.dtype),
        DOT_FP32=kernels_interpreted(),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_E=_block_e(num_experts),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return h


def gemm_scatter(
    h: torch.Tensor,
    plan: DispatchPlan,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    out_scale: float,
    dst: torch.Tensor,
    config: KernelConfig,
) -> torch.Tensor:
    """Kernel B into ``dst`` ([N * k, D]): ``dst[order[r]] = gate * out_scale * (h[r] @ w2[e].T + b2[e])``.

    Every row of ``dst`` is written exactly once (zeros for dropped assignments).
    """
    num_rows, num_experts = plan.num_rows, plan.num_experts
    hidden, ffn = w2.shape[1], w2.shape[2]
    bias = b2 if b2 is not None else w2  # placeholder pointer, never read
    grid = (_tile_grid_m(num_rows, num_experts, config.block_m), triton.cdiv(hidden, config.block_n))
    _gemm_scatter_kernel[grid](
        h,
        plan.order,
        plan.gate,
        plan.counts,
        plan.offsets,
        w2,
        bias,
        dst,
        float(out_scale),
        num_rows,
        num_experts,
        hidden,
        ffn,
        h.stride(0),
        h.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        b2.stride(0) if b2 is not None else 0,
        b2.stride(1) if b2 is not None else 0,
        dst.stride(0),
        dst.stride(1),
        HAS_BIAS=b2 is not None,
        DOT_PRECISION=_dot_precision(w2.dtype),
        DOT_FP32=kernels_interpreted(),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_E=_block_e(num_experts),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return dst


def kernels_interpreted() -> bool:
    """True when triton runs these kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return InterpretedFunction is not None and isinstance(_gemm_scatter_kernel, InterpretedFunction)


def kernel_supported(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: Activation) -> bool:
    """Whether the fused kernels handle this call (else ``moe_ffn`` runs the torch reference)."""
    if activation.name not in _KERNEL_ACTIVATION:
        return False
    if x.dtype not in _DTYPES or w1.dtype not in _DTYPES or w2.dtype not in _DTYPES:
        return False
    if x.device.type == "cuda":
        return not kernels_interpreted()
    return x.device.type == "cpu" and kernels_interpreted()


def moe_ffn_with_configs(
    x: torch.Tensor,
    plan: DispatchPlan,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: Activation,
    out_scale: float,
    gemm1: KernelConfig,
    gemm2: KernelConfig,
) -> torch.Tensor:
    """``moe_ffn`` with explicit launch configs (tests, tuning). The activation must be kernel-supported."""
    out = torch.empty((plan.num_tokens, x.shape[1]), dtype=x.dtype, device=x.device)
    if plan.num_rows == 0:
        return out.zero_()
    kernel_act = _KERNEL_ACTIVATION[activation.name]
    h = torch.empty((plan.num_rows, w1.shape[1]), dtype=w2.dtype, device=x.device)
    if x.device.type == "cuda":
        # Triton launches on the current device; models split by a device map live on several.
        with torch.cuda.device(x.device):
            return _run(x, plan, w1, b1, w2, b2, kernel_act, out_scale, gemm1, gemm2, h, out)
    return _run(x, plan, w1, b1, w2, b2, kernel_act, out_scale, gemm1, gemm2, h, out)


def _run(
    x: torch.Tensor,
    plan: DispatchPlan,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    kernel_act: str,
    out_scale: float,
    gemm1: KernelConfig,
    gemm2: KernelConfig,
    h: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    gather_gemm_act(x, plan, w1, b1, kernel_act, h, gemm1)
    top_k = plan.top_k
    if top_k == 1:
        # order is a permutation of tokens: kernel B writes every output row exactly once.
        gemm_scatter(h, plan, w2, b2, out_scale, out, gemm2)
        return out
    slots = torch.empty((plan.num_tokens * top_k, out.shape[1]), dtype=out.dtype, device=out.device)
    gemm_scatter(h, plan, w2, b2, out_scale, slots, gemm2)
    # A plain reduction over the slot dim: fixed order, deterministic.
    return torch.sum(slots.view(plan.num_tokens, top_k, -1), dim=1, out=out)


def moe_ffn(
    x: torch.Tensor,
    plan: DispatchPlan,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: Activation,
    out_scale: float = 1.0,
) -> torch.Tensor:
    """Run the experts over ``plan`` and combine: ``out[n] = sum_k gate * out_scale * expert(x[n])``.

    Same contract as ``torch_moe_ffn``; calls it for activations or dtypes the kernels do not cover,
    and on CPU unless triton's interpreter is active.
    """
    if not kernel_supported(x, w1, w2, activation):
        return torch_moe_ffn(x, plan, w1, b1, w2, b2, activation, out_scale)
    gemm1, gemm2 = get_configs(x.device, plan.num_experts, w1.shape[2], w1.shape[1], plan.top_k, plan.num_tokens)
    return moe_ffn_with_configs(x, plan, w1, b1, w2, b2, activation, out_scale, gemm1, gemm2)
