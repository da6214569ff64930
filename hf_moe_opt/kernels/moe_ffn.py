"""Fused Triton expert compute over a dispatch plan (dynamic gating, no padding to a capacity).

Two kernels, both driven by the plan's rows sorted by expert:

* ``gather_gemm_act``: ``h[r] = act(x[token[r]] @ w1[e].T + b1[e])`` -- the gather of token rows is
  fused into GEMM1's loads, accumulation in fp32, ``h`` stored in ``w2``'s dtype. Gated experts
  (SiLU-GLU and kin) compute the gate and up columns of the fused ``w1`` as two accumulators in the
  same program and store ``act(gate) * up``: ``h`` has ``F`` columns, never ``2F``.
* ``gemm_scatter``: ``dst[order[r]] = gate[r] * out_scale * (h[r] @ w2[e].T + b2[e])``. ``order`` is
  a permutation, so every destination row has exactly one writer: no atomics, deterministic.
  Dropped rows (after ``offsets[-1]``) write zeros. For ``top_k > 1`` the ``k`` slots of a token
  are then summed in a fixed order.

Tile scheduling needs no host sync: each program derives its expert, row range and column tile
from ``plan.counts`` on the device (per-expert tile counts, a cumulative sum, a compare-and-count).
The 1-D grid is sized for the worst case (``cdiv(A, BLOCK_M)`` row tiles plus one partial tile per
non-empty group, times the column tiles), unused programs exit at once, and tiles never straddle
experts. Programs are ordered expert by expert, and inside an expert in groups of ``GROUP_M`` row
tiles that sweep the column tiles together: an expert's weight tile is read from memory once and
served from L2 to its row tiles, and its rows stay in L2 while the columns are swept. With fixed
shapes the whole forward is capturable in a CUDA graph.

With ``KernelConfig.tail_m`` set, a program whose row tile is the last of its group and holds at
most ``tail_m`` rows (``row_end - row_start <= tail_m``: only a group's last tile has that few rows
left) runs the same K loop and epilogue instantiated for ``tail_m``-row tiles: both heights are compiled
into the kernel and each program takes one branch on the device. The grid, tile order and each
output element's accumulation order stay those of ``BLOCK_M``; only a mostly empty tile's MMA shrinks.

With ``KernelConfig.persistent`` a fixed grid of programs loops over the same tiles in the same order
(each looped tile takes its height's branch when tail tiles are on), so results are those of one
program per tile.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..dispatch import DispatchPlan
from ..experts.activation import Activation
from ..experts.torch_backend import torch_moe_ffn
from .launch import cdiv, launch, next_power_of_2
from .launch_config import KernelConfig, fit_shared_memory, get_configs, shared_memory_limit
from .pdl import launch_options, wait_for_producer

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # layout differs across triton versions; then assume compiled kernels
    InterpretedFunction = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None

ENV_TMA = "HF_MOE_OPT_TMA"  # "0" turns the TMA loads off

# Activation names of the model configs -> the kernel's constexpr name.
_KERNEL_ACTIVATION = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "relu2": "relu2",
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _group_tiles(counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tiles of each group (``[BLOCK_E]``): the experts, then the dropped rows as group
    ``num_experts``; zeros past it. Also the kept row count (loaded once per program)."""
    idx = tl.arange(0, BLOCK_E)
    kept = tl.load(offsets_ptr + num_experts - 1).to(tl.int32)
    cnt = tl.load(counts_ptr + idx, mask=idx < num_experts, other=0).to(tl.int32)
    cnt = tl.where(idx == num_experts, num_rows - kept, cnt)
    return (cnt + BLOCK_M - 1) // BLOCK_M, kept


@triton.jit
def _tile_coords(
    pid,
    tiles,
    kept,
    counts_ptr,
    offsets_ptr,
    num_rows,
    num_experts,
    num_n,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Group, row range ``[start, end)`` and column tile of tile ``pid``, given the groups' row
    tiles and the kept row count (:func:`_group_tiles`). A group past ``num_experts`` means an
    unused program of the worst-case grid."""
    idx = tl.arange(0, BLOCK_E)
    prog_end = tl.cumsum(tiles, axis=0) * num_n
    # Groups whose programs end at or before this one precede it; their number is this group.
    group = tl.sum((prog_end <= pid).to(tl.int32), axis=0)
    first_prog = tl.sum(tl.where(idx < group, tiles, 0), axis=0) * num_n
    group_tiles = tl.sum(tl.where(idx == group, tiles, 0), axis=0)
    # Inside the group: GROUP_M row tiles at a time, row tile fastest, then the column tile.
    local = pid - first_prog
    width = GROUP_M * num_n
    first_m = (local // width) * GROUP_M
    size_m = tl.maximum(tl.minimum(group_tiles - first_m, GROUP_M), 1)
    tile_m = first_m + (local % width) % size_m
    tile_n = (local % width) // size_m
    is_expert = group < num_experts
    last = tl.minimum(group, num_experts - 1)
    end = tl.where(is_expert, tl.load(offsets_ptr + last).to(tl.int32), num_rows)
    size = tl.where(is_expert, tl.load(counts_ptr + last).to(tl.int32), num_rows - kept)
    start = end - size + tile_m * BLOCK_M
    return group, start, end, tile_n


@triton.jit
def _expert_tiles(tiles, num_experts, num_n, BLOCK_E: tl.constexpr):
    """Tiles of all experts' rows (the dropped rows' group left out): a persistent loop's length."""
    idx = tl.arange(0, BLOCK_E)
    return tl.sum(tl.where(idx < num_experts, tiles, 0), axis=0) * num_n


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
    elif ACTIVATION == "relu2":  # squared ReLU (Nemotron-H's experts)
        x = tl.maximum(x, 0.0)
        x = x * x
    return x


@triton.jit
def _glu(gate, up, alpha, limit, ACTIVATION: tl.constexpr, GLU: tl.constexpr):
    """``[rows, F]`` gate and up accumulators (fp32, bias added) -> the gated activation."""
    if GLU == "clamped_swiglu":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    if GLU == "limited_swiglu":  # plain SiLU-GLU on clamped halves
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if GLU == "softcapped_swiglu":  # alpha, limit: the gate and up softcaps; c * tanh(x / c) via sigmoid
        capped_gate = alpha * (2.0 * tl.sigmoid(2.0 * gate / alpha) - 1.0)
        capped_up = limit * (2.0 * tl.sigmoid(2.0 * up / limit) - 1.0)
        return capped_gate * tl.sigmoid(gate) * capped_up
    if GLU == "act_limited":  # the gate's limit after its activation
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return tl.minimum(_activate(gate, ACTIVATION), limit) * up
    return _activate(gate, ACTIVATION) * up


@triton.jit
def _gather_gemm_act_tile(
    x_ptr,
    token_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    w_desc,
    group,
    row_start,
    row_end,
    pid_n,
    N,
    K,
    w_rows,
    row_mul,
    up_offset,
    alpha,
    limit,
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
    GLU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Kernel A's tile of rows ``[row_start, min(row_start + BLOCK_M, row_end))`` of expert ``group``
    and column tile ``pid_n``: the K loop and the epilogue, for either tile height of the kernel."""
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    tok = tl.load(token_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_base = w_ptr + group.to(tl.int64) * stride_we
    # Gated experts: output column n reads W1 row n * row_mul (gate) and that + up_offset (up).
    gate_rows = offs_n * row_mul
    w_ptrs = w_base + gate_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = w_ptrs + up_offset * stride_wn
    # TMA: w_desc views W1 as [E * w_rows, K] (row_mul == 1); tiles past K or the last row read zeros.
    w_row = group * w_rows + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Whole K tiles need no K mask (a compare and a select per element of the pipelined loads).
        # Rows past the group stay masked unless groups span many row tiles (see _mask_rows).
        if EVEN_K:
            mask_w = mask_n[None, :]
            if MASK_ROWS:
                a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            else:
                a = tl.load(x_ptrs)  # rows past the group read token 0's row, never stored
        else:
            mask_k = offs_k < K - k0
            mask_w = mask_k[:, None] & mask_n[None, :]
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if USE_TMA:
            w = tl.trans(w_desc.load([w_row, k0]))
        elif EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask_w, other=0.0)
        a = a.to(w.dtype)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GLU != "none":
            if USE_TMA:
                u = tl.trans(w_desc.load([w_row + up_offset, k0]))
            elif EVEN_K and EVEN_N:
                u = tl.load(u_ptrs)
            else:
                u = tl.load(u_ptrs, mask=mask_w, other=0.0)
            if DOT_FP32:
                u = u.to(tl.float32)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_base = b_ptr + group.to(tl.int64) * stride_be
        acc += tl.load(b_base + gate_rows * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GLU != "none":
            bias_up = tl.load(b_base + (gate_rows + up_offset) * stride_bn, mask=mask_n, other=0.0)
            acc_up += bias_up.to(tl.float32)[None, :]
    if GLU != "none":
        acc = _glu(acc, acc_up, alpha, limit, ACTIVATION, GLU)
    else:
        acc = _activate(acc, ACTIVATION)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gather_gemm_act_kernel(
    x_ptr,
    token_ptr,
    counts_ptr,
    offsets_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    w_desc,
    num_rows,
    num_experts,
    N,
    K,
    w_rows,
    row_mul,
    up_offset,
    alpha,
    limit,
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
    GLU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    TAIL_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
    FLATTEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles, kept = _group_tiles(counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M, BLOCK_E)
    if PERSISTENT:
        # A fixed grid of programs loops over the experts' tiles (the dropped rows are never
        # computed); flattened, the next tile's loads start during this tile's epilogue. Same tiles,
        # same K order: bit-identical to one tile per program.
        for pid in tl.range(
            tl.program_id(0), _expert_tiles(tiles, num_experts, num_n, BLOCK_E), tl.num_programs(0), flatten=FLATTEN
        ):
            group, row_start, row_end, pid_n = _tile_coords(
                pid, tiles, kept, counts_ptr, offsets_ptr, num_rows, num_experts, num_n, BLOCK_M, BLOCK_E, GROUP_M
            )
            if TAIL_M > 0 and row_end - row_start <= TAIL_M:  # a short last tile, as below
                _gather_gemm_act_tile(
                    x_ptr, token_ptr, w_ptr, b_ptr, h_ptr, w_desc, group, row_start, row_end, pid_n, N, K, w_rows,
                    row_mul, up_offset, alpha, limit, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                    stride_be, stride_bn, stride_hm, stride_hn, HAS_BIAS, ACTIVATION, GLU, DOT_PRECISION, DOT_FP32,
                    EVEN_K, EVEN_N, MASK_ROWS, TAIL_M, BLOCK_N, BLOCK_K, USE_TMA,
                )  # fmt: skip
            else:
                _gather_gemm_act_tile(
                    x_ptr, token_ptr, w_ptr, b_ptr, h_ptr, w_desc, group, row_start, row_end, pid_n, N, K, w_rows,
                    row_mul, up_offset, alpha, limit, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                    stride_be, stride_bn, stride_hm, stride_hn, HAS_BIAS, ACTIVATION, GLU, DOT_PRECISION, DOT_FP32,
                    EVEN_K, EVEN_N, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA,
                )  # fmt: skip
        return
    group, row_start, row_end, pid_n = _tile_coords(
        tl.program_id(0), tiles, kept, counts_ptr, offsets_ptr, num_rows, num_experts, num_n, BLOCK_M, BLOCK_E, GROUP_M
    )
    if group >= num_experts:  # dropped rows are never computed; unused programs exit
        return
    # An expert's last row tile holding at most TAIL_M rows runs as a TAIL_M-row tile: same program,
    # same K tiles in the same order, a smaller MMA. Only last tiles can be that short.
    if TAIL_M > 0 and row_end - row_start <= TAIL_M:
        _gather_gemm_act_tile(
            x_ptr, token_ptr, w_ptr, b_ptr, h_ptr, w_desc, group, row_start, row_end, pid_n, N, K, w_rows, row_mul,
            up_offset, alpha, limit, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
            stride_hm, stride_hn, HAS_BIAS, ACTIVATION, GLU, DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N, MASK_ROWS,
            TAIL_M, BLOCK_N, BLOCK_K, USE_TMA,
        )  # fmt: skip
    else:
        _gather_gemm_act_tile(
            x_ptr, token_ptr, w_ptr, b_ptr, h_ptr, w_desc, group, row_start, row_end, pid_n, N, K, w_rows, row_mul,
            up_offset, alpha, limit, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
            stride_hm, stride_hn, HAS_BIAS, ACTIVATION, GLU, DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N, MASK_ROWS,
            BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA,
        )  # fmt: skip


@triton.jit
def _gemm_scatter_tile(
    h_ptr,
    order_ptr,
    gate_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    h_desc,
    w_desc,
    group,
    row_start,
    row_end,
    pid_n,
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
    k_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_W: tl.constexpr,
):
    """Kernel B's tile of rows ``[row_start, min(row_start + BLOCK_M, row_end))`` of expert ``group``
    and column tile ``pid_n`` (K split ``program_id(1)``): the K loop and the epilogue (partials, or
    bias, gate and scatter), for either tile height of the kernel."""
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_out = mask_m[:, None] & mask_n[None, :]
    dst = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    out_ptrs = out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on
    # K range of this program: everything, or split number program_id(1) of a split-K launch.
    k_begin = tl.program_id(1) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    # Unmasked row loads read a valid row of h (clamped); rows past the group are never stored.
    rows_in = rows if MASK_ROWS else tl.minimum(rows, num_rows - 1)
    h_ptrs = h_ptr + rows_in.to(tl.int64)[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_base = w_ptr + group.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    # TMA: w_desc is W2 as [E * N, K], h_desc (TMA_A) is h ([A, K]); past K and past the last row
    # read zeros. Rows past the group are the next group's (never stored), so no row mask either.
    w_row = group * N + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if TMA_W:
            if TMA_A:
                a = h_desc.load([row_start, k_begin + k0])
            elif EVEN_K and not MASK_ROWS:
                a = tl.load(h_ptrs)
            elif EVEN_K:
                a = tl.load(h_ptrs, mask=mask_m[:, None], other=0.0)
            else:
                a = tl.load(h_ptrs, mask=mask_m[:, None] & (offs_k < k_stop - k0)[None, :], other=0.0)
            w = tl.trans(w_desc.load([w_row, k_begin + k0]))
        elif EVEN_K:
            if MASK_ROWS:
                a = tl.load(h_ptrs, mask=mask_m[:, None], other=0.0)
            else:
                a = tl.load(h_ptrs)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < k_stop - k0
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT:
        # fp32 partial of sorted row r at out[split, r, n]; strides: om = row, on = split plane.
        part_ptrs = out_ptr + tl.program_id(1).to(tl.int64) * stride_on + rows.to(tl.int64)[:, None] * stride_om
        tl.store(part_ptrs + offs_n[None, :], acc, mask=mask_out)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + group.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        gate = tl.load(gate_ptr + rows, mask=mask_m, other=0.0).to(tl.float32) * out_scale
        acc = acc * gate[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _dropped_tile(
    order_ptr, out_ptr, row_start, row_end, pid_n, N, stride_om, stride_on, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Zeros into the output slots of dropped rows ``[row_start, min(row_start + BLOCK_M, row_end))``:
    they contribute nothing, but every slot must be defined."""
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dst = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    out_ptrs = out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptrs, zeros, mask=mask_m[:, None] & (offs_n < N)[None, :])


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
    h_desc,
    w_desc,
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
    k_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_W: tl.constexpr,
    TAIL_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
    FLATTEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles, kept = _group_tiles(counts_ptr, offsets_ptr, num_rows, num_experts, BLOCK_M, BLOCK_E)
    if PERSISTENT:  # never split (see KernelConfig): the experts' tiles as in kernel A, then the dropped rows'
        expert_tiles = _expert_tiles(tiles, num_experts, num_n, BLOCK_E)
        for pid in tl.range(tl.program_id(0), expert_tiles, tl.num_programs(0), flatten=FLATTEN):
            group, row_start, row_end, pid_n = _tile_coords(
                pid, tiles, kept, counts_ptr, offsets_ptr, num_rows, num_experts, num_n, BLOCK_M, BLOCK_E, GROUP_M
            )
            if TAIL_M > 0 and row_end - row_start <= TAIL_M:  # a short last tile, h by pointer (as below)
                _gemm_scatter_tile(
                    h_ptr, order_ptr, gate_ptr, w_ptr, b_ptr, out_ptr, h_desc, w_desc, group, row_start, row_end,
                    pid_n, out_scale, num_rows, num_experts, N, K, stride_hm, stride_hk, stride_we, stride_wn,
                    stride_wk, stride_be, stride_bn, stride_om, stride_on, k_per_split, HAS_BIAS, False,
                    DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N, MASK_ROWS, TAIL_M, BLOCK_N, BLOCK_K, False, TMA_W,
                )  # fmt: skip
            else:
                _gemm_scatter_tile(
                    h_ptr, order_ptr, gate_ptr, w_ptr, b_ptr, out_ptr, h_desc, w_desc, group, row_start, row_end,
                    pid_n, out_scale, num_rows, num_experts, N, K, stride_hm, stride_hk, stride_we, stride_wn,
                    stride_wk, stride_be, stride_bn, stride_om, stride_on, k_per_split, HAS_BIAS, False,
                    DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, TMA_A, TMA_W,
                )  # fmt: skip
        dropped_tiles = tl.sum(tl.where(tl.arange(0, BLOCK_E) == num_experts, tiles, 0), axis=0) * num_n
        for pid in range(tl.program_id(0), dropped_tiles, tl.num_programs(0)):
            dropped, row_start, row_end, pid_n = _tile_coords(
                expert_tiles + pid, tiles, kept, counts_ptr, offsets_ptr, num_rows, num_experts, num_n, BLOCK_M,
                BLOCK_E, GROUP_M,
            )  # fmt: skip
            _dropped_tile(order_ptr, out_ptr, row_start, row_end, pid_n, N, stride_om, stride_on, BLOCK_M, BLOCK_N)
        return
    group, row_start, row_end, pid_n = _tile_coords(
        tl.program_id(0), tiles, kept, counts_ptr, offsets_ptr, num_rows, num_experts, num_n, BLOCK_M, BLOCK_E, GROUP_M
    )
    if group > num_experts or (SPLIT and group == num_experts):  # split: the combine writes dropped rows
        return
    if group == num_experts:
        _dropped_tile(order_ptr, out_ptr, row_start, row_end, pid_n, N, stride_om, stride_on, BLOCK_M, BLOCK_N)
        return
    # A short last row tile of a group (see kernel A); its rows of h by pointer: h_desc's tiles are
    # BLOCK_M rows.
    if TAIL_M > 0 and row_end - row_start <= TAIL_M:
        _gemm_scatter_tile(
            h_ptr, order_ptr, gate_ptr, w_ptr, b_ptr, out_ptr, h_desc, w_desc, group, row_start, row_end, pid_n,
            out_scale, num_rows, num_experts, N, K, stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_be,
            stride_bn, stride_om, stride_on, k_per_split, HAS_BIAS, SPLIT, DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N,
            MASK_ROWS, TAIL_M, BLOCK_N, BLOCK_K, False, TMA_W,
        )  # fmt: skip
    else:
        _gemm_scatter_tile(
            h_ptr, order_ptr, gate_ptr, w_ptr, b_ptr, out_ptr, h_desc, w_desc, group, row_start, row_end, pid_n,
            out_scale, num_rows, num_experts, N, K, stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_be,
            stride_bn, stride_om, stride_on, k_per_split, HAS_BIAS, SPLIT, DOT_PRECISION, DOT_FP32, EVEN_K, EVEN_N,
            MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, TMA_A, TMA_W,
        )  # fmt: skip


@triton.jit
def _split_combine_kernel(
    part_ptr,
    expert_ptr,
    order_ptr,
    gate_ptr,
    b_ptr,
    out_ptr,
    out_scale,
    num_rows,
    num_experts,
    N,
    stride_part,
    stride_be,
    stride_bn,
    stride_om,
    stride_on,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``dst[order[r]] = gate[r] * out_scale * (sum_s part[s, r] + b2[e])``, zeros for dropped rows."""
    wait_for_producer(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < num_rows
    mask = mask_r[:, None] & (offs_n < N)[None, :]
    expert = tl.load(expert_ptr + rows, mask=mask_r, other=num_experts)
    kept = expert < num_experts
    src = part_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    # int64: s * stride_part (stride_part = rows * N) passes 2**31 for large row counts.
    part_stride = tl.zeros((), dtype=tl.int64) + stride_part
    for s in tl.static_range(SPLITS):  # fixed order: deterministic
        acc += tl.load(src + s * part_stride, mask=mask & kept[:, None], other=0.0)
    if HAS_BIAS:
        e = tl.minimum(expert, num_experts - 1).to(tl.int64)
        bias = tl.load(b_ptr + e[:, None] * stride_be + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
        acc += bias.to(tl.float32)
    gate = tl.load(gate_ptr + rows, mask=mask_r, other=0.0).to(tl.float32) * out_scale
    acc = tl.where(kept[:, None], acc * gate[:, None], 0.0)
    dst = tl.load(order_ptr + rows, mask=mask_r, other=0).to(tl.int64)
    tl.store(
        out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _slot_sum_kernel(
    slots_ptr,
    out_ptr,
    num_tokens,
    D,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``out[t] = sum_j slots[t * TOP_K + j]``: fp32 sums in slot order, one rounding (as ``torch.sum``)."""
    wait_for_producer(USE_PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (tokens < num_tokens)[:, None] & (cols < D)[None, :]
    src = slots_ptr + (tokens.to(tl.int64) * TOP_K)[:, None] * D + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(src + j * D, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


# DOT_FP32: triton's interpreter multiplies bf16 tiles as raw uint16 bits and fp16 tiles in fp16, so
# there the operands are widened first (exact: products of 16-bit floats are exact in fp32). Compiled
# kernels keep 16-bit tensor-core dots with fp32 accumulation.


@dataclass(frozen=True)
class KernelActivation:
    """What kernel A applies: an elementwise activation, optionally gated.

    ``glu`` is ``"none"``, ``"glu"`` (``act(gate) * up``), ``"clamped_swiglu"``, ``"limited_swiglu"``,
    ``"act_limited"`` or ``"softcapped_swiglu"``;
    output column ``n``
    of a gated expert reads W1 rows ``n * row_mul`` (gate) and ``n * row_mul + up_offset`` (up).
    """

    name: str
    glu: str = "none"
    row_mul: int = 1
    up_offset: int = 0
    alpha: float = 0.0
    limit: float = 0.0

    @classmethod
    @functools.lru_cache(maxsize=256)  # asked on every call of moe_ffn
    def of(cls, activation: Activation, ffn: int) -> KernelActivation | None:
        """The kernel form of ``activation`` for ``F = ffn`` columns, or None if the kernels lack it."""
        if activation.glu is None:
            name = _KERNEL_ACTIVATION.get(activation.name)
            return None if name is None else cls(name)
        if activation.glu == "clamped_swiglu":
            return cls("silu", "clamped_swiglu", 2, 1, float(activation.alpha), float(activation.limit))
        if activation.glu == "softcapped_swiglu":
            return cls("silu", "softcapped_swiglu", 1, ffn, float(activation.alpha), float(activation.limit))
        if activation.glu == "clamped_swiglu_halves":
            return cls("silu", "clamped_swiglu", 1, ffn, float(activation.alpha), float(activation.limit))
        if activation.glu == "limited_swiglu":
            return cls("silu", "limited_swiglu", 1, ffn, 0.0, float(activation.limit))
        base = activation.name.removeprefix("glu_")
        name = _KERNEL_ACTIVATION.get(base)
        if name is not None and activation.glu == "act_limited":
            return cls(name, "act_limited", 1, ffn, 0.0, float(activation.limit))
        if name is None or activation.glu not in ("concatenated", "interleaved"):
            return None
        if activation.glu == "concatenated":
            return cls(name, "glu", 1, ffn)
        return cls(name, "glu", 2, 1)


def check_expert_shapes(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    kernel_act: KernelActivation,
    num_experts: int | None = None,
) -> None:
    """The kernels take their sizes from the weights: tokens, weights and biases must agree (a
    mismatch would read out of bounds, or compute wrong numbers silently)."""
    experts, rows, hidden = w1.shape
    ffn = w2.shape[2]
    gated = 1 if kernel_act.glu == "none" else 2
    problems = []
    if x.dim() != 2 or x.shape[1] != hidden:
        problems.append(f"tokens {tuple(x.shape)} for experts of width {hidden}")
    if w2.shape[0] != experts or w2.shape[1] != hidden or rows != gated * ffn:
        problems.append(f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} do not make {'gated ' * (gated > 1)}experts")
    if b1 is not None and tuple(b1.shape) != (experts, rows):
        problems.append(f"b1 {tuple(b1.shape)} for w1 {tuple(w1.shape)}")
    if b2 is not None and tuple(b2.shape) != (experts, hidden):
        problems.append(f"b2 {tuple(b2.shape)} for w2 {tuple(w2.shape)}")
    if num_experts is not None and experts < num_experts:
        problems.append(f"the plan routes to {num_experts} experts but the weights hold {experts}")
    if problems:
        raise ValueError("moe_ffn: " + "; ".join(problems))


def _dot_precision(dtype: torch.dtype) -> str | None:
    # Match torch: fp32 matmuls use TF32 only where torch is told to.
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _grid(
    num_rows: int, num_experts: int, block_m: int, columns: int, block_n: int, persistent: int, device: torch.device
) -> tuple[int]:
    # Every non-empty group (experts + dropped rows) can add one partial row tile.
    row_tiles = cdiv(num_rows, block_m) + min(num_experts + 1, num_rows)
    tiles = row_tiles * cdiv(columns, block_n)
    if persistent:  # a loop over the tiles in `persistent` programs per SM, never more than the tiles
        return (max(1, min(tiles, persistent * _multiprocessors(device))),)
    return (tiles,)


# Triton's interpreter runs programs one after another: a few "SMs" make every persistent program
# loop over several tiles, as on a GPU at large batches.
_INTERPRETED_SMS = 3


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETED_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def weight_strides(w: torch.Tensor, b: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of an ``[E, out, in]`` expert weight and its ``[E, out]`` bias (zeros without one), in
    the kernels' argument order."""
    return (*w.stride(), *(b.stride() if b is not None else (0, 0)))


def _mask_rows(num_rows: int, num_experts: int, block_m: int) -> bool:
    """Whether row loads are masked to the group (they always are when K tiles are partial).

    When an average group spans at least 4 row tiles, partial tiles are rare and the predicate-free
    loads of full tiles win (H200: Mixtral-8x7B at 4096 tokens 3% faster); with groups of a tile or
    two, masking saves the loads of the rows past the group (3-15% at <= 512 rows per expert).
    Fixed by the shapes, not the routing, so a captured graph keeps its kernel.
    """
    return num_rows < 4 * block_m * num_experts


def _fit(config: KernelConfig, a: torch.Tensor, w: torch.Tensor, w_tiles: int) -> KernelConfig:
    """``config`` shrunk to this GPU's shared memory (see ``fit_shared_memory``); as is off CUDA."""
    if a.device.type != "cuda":
        return config
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    return fit_shared_memory(config, a.element_size(), w.element_size(), w_tiles, shared_memory_limit(index))


def _block_e(num_experts: int) -> int:
    return max(next_power_of_2(num_experts + 1), 2)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_available(device: torch.device) -> bool:
    """Whether the kernels can load tiles by TMA here: Hopper or newer (or triton's interpreter)."""
    if TensorDescriptor is None or os.environ.get(ENV_TMA, "1") == "0":
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return not kernels_interpreted() and _capability(index)[0] >= 9
    return kernels_interpreted()


def _tma_matrix(t: torch.Tensor, block_rows: int, block_k: int):
    """A TMA descriptor over ``t`` ([A, K] or [E, rows, K], read as [E * rows, K]) in
    ``[block_rows, block_k]`` tiles, or None where TMA cannot read this layout."""
    elem = t.element_size()
    row_stride = t.stride(-2)
    if t.stride(-1) != 1 or (t.dim() == 3 and t.stride(0) != t.shape[1] * row_stride):
        return None
    # 16-byte aligned base and rows; a K tile of 16 to 128 bytes (one swizzle span).
    if t.data_ptr() % 16 or (row_stride * elem) % 16 or not 16 <= block_k * elem <= 128:
        return None
    rows = t.numel() // t.shape[-1] if t.numel() else 0
    if rows == 0:
        return None
    return TensorDescriptor(t, [rows, t.shape[-1]], [row_stride, 1], [block_rows, block_k])


def gather_gemm_act(
    x: torch.Tensor,
    plan: DispatchPlan,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    activation: KernelActivation | str,
    h: torch.Tensor,
    config: KernelConfig,
) -> torch.Tensor:
    """Kernel A into ``h`` ([A, F]): ``act(x[plan.token] @ w1[e].T + b1[e])`` for the kept rows.

    ``activation`` is a :class:`KernelActivation` or an elementwise kernel name (``relu``, ``gelu``,
    ``gelu_tanh``, ``silu``, ``relu2``). For gated activations ``w1`` has ``2F`` rows and ``h`` ``F`` columns.
    Rows of dropped assignments are left unwritten.
    """
    if isinstance(activation, str):
        activation = KernelActivation(activation)
    config = _fit(config, x, w1, 1 if activation.glu == "none" else 2)
    num_rows, num_experts = plan.num_rows, plan.num_experts
    ffn, hidden = h.shape[1], w1.shape[2]
    bias = b1 if b1 is not None else w1  # placeholder pointer, never read
    w_desc = None
    if config.tma and activation.row_mul == 1 and tma_available(x.device):
        w_desc = _tma_matrix(w1, config.block_n, config.block_k)
    launch(
        _gather_gemm_act_kernel,
        _grid(num_rows, num_experts, config.block_m, ffn, config.block_n, config.persistent, x.device),
        x,
        plan.token,
        plan.counts,
        plan.offsets,
        w1,
        bias,
        h,
        w_desc,
        num_rows,
        num_experts,
        ffn,
        hidden,
        w1.shape[1],
        activation.row_mul,
        activation.up_offset,
        activation.alpha,
        activation.limit,
        x.stride(0),
        x.stride(1),
        *weight_strides(w1, b1),
        h.stride(0),
        h.stride(1),
        HAS_BIAS=b1 is not None,
        ACTIVATION=activation.name,
        GLU=activation.glu,
        DOT_PRECISION=_dot_precision(w1.dtype),
        DOT_FP32=kernels_interpreted(),
        EVEN_K=hidden % config.block_k == 0,
        EVEN_N=ffn % config.block_n == 0,
        MASK_ROWS=_mask_rows(num_rows, num_experts, config.block_m),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_E=_block_e(num_experts),
        GROUP_M=config.group_m,
        USE_TMA=w_desc is not None,
        TAIL_M=config.tail_m,
        PERSISTENT=config.persistent > 0,
        FLATTEN=bool(config.flatten),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(x.device),
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

    Every row of ``dst`` is written exactly once (zeros for dropped assignments). With
    ``config.split_k > 1`` the K dimension is split over programs writing fp32 partials, which a
    second kernel sums in a fixed order before the gate, bias and scatter.
    """
    config = _fit(config, h, w2, 1)
    num_rows, num_experts = plan.num_rows, plan.num_experts
    hidden, ffn = w2.shape[1], w2.shape[2]
    splits = config.split_k if num_rows > 0 else 1
    k_per_split = cdiv(cdiv(ffn, splits), config.block_k) * config.block_k
    splits = cdiv(ffn, k_per_split)  # no empty splits
    part = torch.empty((splits, num_rows, hidden), dtype=torch.float32, device=h.device) if splits > 1 else None
    target = part if part is not None else dst
    # Partials: row stride hidden, split-plane stride passed as "stride_on" (see the kernel).
    stride_om, stride_on = (hidden, num_rows * hidden) if part is not None else (dst.stride(0), dst.stride(1))
    bias = b2 if b2 is not None else w2  # placeholder pointer, never read
    # tma 1: W2 and h by TMA; tma 2: W2 only (h by pointer). h needs W2's descriptor too.
    h_desc = w_desc = None
    if config.tma and tma_available(h.device):
        w_desc = _tma_matrix(w2, config.block_n, config.block_k)
        if w_desc is not None and config.tma == 1:
            h_desc = _tma_matrix(h, config.block_m, config.block_k)
    grid = _grid(num_rows, num_experts, config.block_m, hidden, config.block_n, config.persistent, h.device)
    grid += (splits,)
    launch(
        _gemm_scatter_kernel,
        grid,
        h,
        plan.order,
        plan.gate,
        plan.counts,
        plan.offsets,
        w2,
        bias,
        target,
        h_desc,
        w_desc,
        float(out_scale),
        num_rows,
        num_experts,
        hidden,
        ffn,
        h.stride(0),
        h.stride(1),
        *weight_strides(w2, b2),
        stride_om,
        stride_on,
        k_per_split,
        HAS_BIAS=b2 is not None,
        SPLIT=part is not None,
        DOT_PRECISION=_dot_precision(w2.dtype),
        DOT_FP32=kernels_interpreted(),
        # Every split covers whole K tiles and ends inside K.
        EVEN_K=ffn % k_per_split == 0,
        EVEN_N=hidden % config.block_n == 0,
        MASK_ROWS=_mask_rows(num_rows, num_experts, config.block_m),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        BLOCK_E=_block_e(num_experts),
        GROUP_M=config.group_m,
        TMA_A=h_desc is not None,
        TMA_W=w_desc is not None,
        TAIL_M=config.tail_m,
        PERSISTENT=config.persistent > 0,
        FLATTEN=bool(config.flatten),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(h.device),
    )
    if part is not None:
        block_r, block_n = 16, 128
        launch(
            _split_combine_kernel,
            (cdiv(num_rows, block_r), cdiv(hidden, block_n)),
            part,
            plan.expert,
            plan.order,
            plan.gate,
            bias,
            dst,
            float(out_scale),
            num_rows,
            num_experts,
            hidden,
            num_rows * hidden,
            b2.stride(0) if b2 is not None else 0,
            b2.stride(1) if b2 is not None else 0,
            dst.stride(0),
            dst.stride(1),
            SPLITS=splits,
            HAS_BIAS=b2 is not None,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            **launch_options(h.device),
        )
    return dst


def kernels_interpreted() -> bool:
    """True when triton runs these kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return InterpretedFunction is not None and isinstance(_gemm_scatter_kernel, InterpretedFunction)


def kernel_supported(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: Activation) -> bool:
    """Whether the fused kernels handle this call (else ``moe_ffn`` runs the torch reference)."""
    if KernelActivation.of(activation, w2.shape[-1] if w2.dim() == 3 else 0) is None:
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
    ffn = w2.shape[2]
    kernel_act = KernelActivation.of(activation, ffn)
    if kernel_act is None:
        raise ValueError(f"the Triton kernels do not implement activation {activation.name!r}")
    check_expert_shapes(x, w1, b1, w2, b2, kernel_act, plan.num_experts)
    h = torch.empty((plan.num_rows, ffn), dtype=w2.dtype, device=x.device)
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
    kernel_act: KernelActivation,
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
    return slot_sum(slots, top_k, out)


def slot_sum(slots: torch.Tensor, top_k: int, out: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j slots[t * top_k + j]`` in a fixed order (deterministic), summed in fp32.

    ``torch.sum`` over the slot dim of ``[N, k, D]`` reads with a stride and ran at a third of the copy
    bandwidth on an H200 (nllb-moe-54b, 16384 tokens: 150 us for 200 MB).
    """
    num_tokens, hidden = out.shape
    if out.stride(1) != 1 or not slots.is_contiguous() or slots.shape != (num_tokens * top_k, hidden):
        raise ValueError("slot_sum needs contiguous [N * k, D] slots and an [N, D] output with unit column stride")
    if num_tokens == 0:
        return out
    block_d = min(next_power_of_2(hidden), 1024)
    block_t = max(4096 // block_d, 1)
    launch(
        _slot_sum_kernel,
        (cdiv(num_tokens, block_t), cdiv(hidden, block_d)),
        slots,
        out,
        num_tokens,
        hidden,
        out.stride(0),
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
        **launch_options(out.device),
    )
    return out


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
    gemm1, gemm2 = get_configs(x.device, plan.num_experts, w1.shape[2], w2.shape[2], plan.top_k, plan.num_tokens)
    return moe_ffn_with_configs(x, plan, w1, b1, w2, b2, activation, out_scale, gemm1, gemm2)
