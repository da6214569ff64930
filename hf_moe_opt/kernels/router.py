"""The fused router: two Triton launches for a small batch (decode steps), one for a large one.

In torch a router is a cast, a GEMM (or GEMV), a softmax, another cast, an arg-max or a top-k and a
gather: seven launches that cost more than they compute when a decode step routes a few tokens, and
at thousands of tokens a float32 copy of the tokens plus a float32 cuBLAS GEMM that take longer than
the routing itself. Here:

* up to :data:`MAX_TOKENS` tokens, ``_logits_kernel`` -- ``logits = x @ W.T (+ b)`` with fp32
  products and accumulation of the values as stored (a bf16 weight upcast in registers is exactly
  the float32 copy torch would make), rounded to the logits' dtype; a grid over tokens x expert
  blocks, so the weight is streamed by many programs -- then ``_route_kernel``, one program per
  token: softmax in float32 and the family's choice;
* above it, ``_large_router_kernel`` -- one program per block of ``BLOCK_T`` tokens computes their
  ``[BLOCK_T, E]`` logits with ``tl.dot`` over the hidden dimension in chunks (fp32 accumulation),
  stores them rounded to the logits' dtype and routes the tile in registers: row-wise softmax,
  arg-max / top-k and gates, the same steps as ``_route_kernel``. The tokens are read once, in their
  own dtype (no float32 copy), and the logits never leave the program before routing.

Precision of the large-batch dot (torch's float32 router is an IEEE fp32 GEMM):

* both operands of one 16-bit dtype: a 16-bit tensor-core dot; products of 16-bit floats are exact
  in fp32, so the result equals the fp32 GEMM up to the order of the sums;
* bf16 tokens and a float32 weight (a router kept in float32): the weight is split in registers into
  three bf16 parts ``hi + mid + lo`` that sum to it exactly (8 + 8 + 8 significant bits), and three
  bf16 dots accumulate ``x @ lo``, ``x @ mid``, ``x @ hi``: again exact products, fp32 sums -- and
  cheaper than ``tf32x3`` (three bf16 passes cost half of three tf32 passes);
* otherwise (float32 tokens, fp16 tokens with a float32 weight, two different 16-bit dtypes) both
  operands are widened to fp32 and the dot runs with ``input_precision="tf32x3"`` (``"tf32"`` where
  both are 16-bit: bf16 and fp16 values are exact in tf32): fp32 accuracy, a few ulps off IEEE;
* in triton's interpreter (CPU tests) every operand is widened to fp32 first: it multiplies bf16
  tiles as raw bits (as ``DOT_FP32`` in :mod:`hf_moe_opt.kernels.moe_ffn`).

Modes (the semantics of :mod:`hf_moe_opt.routing`, same dtypes at every step):

* ``switch`` -- top-1 on the probabilities cast to the input dtype, gate = that probability (a
  binding capacity is applied by the caller: :func:`hf_moe_opt.routing.switch.switch_keep`);
* ``nllb`` -- top-1 as Switch, second expert = arg-max of the logits with the first masked, both
  probabilities renormalised in the input dtype (the no-drop case: policy "all", no padding, no
  binding capacity);
* ``softmax_topk`` -- Mixtral / Qwen-MoE / OLMoE: top-k of the float32 probabilities (descending,
  ties to the lower expert), optionally renormalised, cast to the weights' dtype;
* ``topk_sigmoid`` -- Llama 4: top-k of the logits as stored (descending, ties to the lower expert),
  gate = sigmoid of the chosen logit in float32, cast to the gates' dtype.

Results equal the torch routers' up to the order of the sums (last-bit differences in the logits; a
choice can differ only where two experts' scores tie to that precision).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .moe_ffn import kernels_interpreted
from .pdl import launch_options, wait_for_producer

MODES = {"switch": 0, "nllb": 1, "softmax_topk": 2, "topk_sigmoid": 3}
# Experts per token of the modes whose k is fixed.
FIXED_TOP_K = {"switch": 1, "nllb": 2}
# Largest batch of the two-launch path (GEMV logits, one routing program per token); larger batches
# take the one-launch tiled kernel. Expert count and k of both.
MAX_TOKENS = 64
MAX_EXPERTS = 512
MAX_TOP_K = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logits_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    num_experts,
    hidden,
    stride_x,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    t = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < hidden
        xv = tl.load(x_ptr + t * stride_x + d, mask=d_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * hidden + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * num_experts + e, acc.to(out_ptr.dtype.element_ty), mask=e_ok)


@triton.jit
def _first_argmax(v, e, BLOCK_E: tl.constexpr):
    """Value and lowest index of the maximum of ``v`` (as ``torch.argmax``: a NaN ranks above every
    number, so a non-finite token picks an expert in range and its NaN gate carries to the output).
    The value is exact for probabilities (never infinite); an infinite maximum comes back as NaN."""
    key = tl.where(v != v, float("inf"), v)
    best = tl.max(key, axis=0)
    idx = tl.min(tl.where(key == best, e, BLOCK_E), axis=0)
    return tl.where(best == float("inf"), float("nan"), best), idx


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _first_free_argmax(v, free, e, BLOCK_E: tl.constexpr):
    """Largest ``v`` among the ``free`` entries and its lowest index (NaN first, as ``torch.topk``),
    returned as stored (NaN, -inf and all). Unlike :func:`_first_argmax` it takes raw logits, which
    may be -inf: taken entries are masked by ``free``, not by a sentinel value."""
    key = tl.where(free, tl.where(v != v, float("inf"), v), float("-inf"))
    best = tl.max(key, axis=0)
    idx = tl.min(tl.where((key == best) & free, e, BLOCK_E), axis=0)
    return tl.sum(tl.where(e == idx, v, 0.0), axis=0), idx


@triton.jit
def _route_kernel(
    logits_ptr,
    index_ptr,
    gates_ptr,
    num_experts,
    eps,
    MODE: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    logits = tl.load(logits_ptr + t * num_experts + e, mask=e_ok, other=float("-inf")).to(tl.float32)
    shifted = tl.exp(logits - tl.max(logits, axis=0))
    probs = shifted / tl.sum(shifted, axis=0)
    gate_ty = gates_ptr.dtype.element_ty
    if MODE == 2:
        k = tl.arange(0, BLOCK_K)
        weights = tl.zeros([BLOCK_K], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_K], dtype=tl.int32)
        left = tl.where(e_ok, probs, -1.0)
        for i in tl.static_range(TOP_K):
            best, idx = _first_argmax(left, e, BLOCK_E)
            weights = tl.where(k == i, best, weights)
            chosen = tl.where(k == i, idx, chosen)
            left = tl.where(e == idx, -1.0, left)
        if NORMALIZE:
            weights = weights / tl.sum(weights, axis=0)
        tl.store(index_ptr + t * TOP_K + k, chosen.to(tl.int64), mask=k < TOP_K)
        tl.store(gates_ptr + t * TOP_K + k, weights.to(gate_ty), mask=k < TOP_K)
    elif MODE == 3:
        k = tl.arange(0, BLOCK_K)
        weights = tl.zeros([BLOCK_K], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_K], dtype=tl.int32)
        free = e_ok
        for i in tl.static_range(TOP_K):
            best, idx = _first_free_argmax(logits, free, e, BLOCK_E)
            weights = tl.where(k == i, _sigmoid(best), weights)
            chosen = tl.where(k == i, idx, chosen)
            free = free & (e != idx)
        tl.store(index_ptr + t * TOP_K + k, chosen.to(tl.int64), mask=k < TOP_K)
        tl.store(gates_ptr + t * TOP_K + k, weights.to(gate_ty), mask=k < TOP_K)
    else:
        # Switch and NLLB choose on the probabilities rounded to the input (= gates') dtype.
        rounded = tl.where(e_ok, probs.to(gate_ty).to(tl.float32), -1.0)
        p1, top1 = _first_argmax(rounded, e, BLOCK_E)
        if MODE == 0:
            tl.store(index_ptr + t, top1.to(tl.int64))
            tl.store(gates_ptr + t, p1.to(gate_ty))
        else:
            _, top2 = _first_argmax(tl.where(e == top1, float("-inf"), logits), e, BLOCK_E)
            p2 = tl.sum(tl.where(e == top2, rounded, 0.0), axis=0)
            # The renormalisation in the input dtype: each operation rounded as torch does.
            denom = tl.maximum((p1 + p2).to(gate_ty).to(tl.float32), eps)
            tl.store(index_ptr + 2 * t, top1.to(tl.int64))
            tl.store(index_ptr + 2 * t + 1, top2.to(tl.int64))
            tl.store(gates_ptr + 2 * t, (p1 / denom).to(gate_ty))
            tl.store(gates_ptr + 2 * t + 1, (p2 / denom).to(gate_ty))


@triton.jit
def _row_argmax(v, e, BLOCK_E: tl.constexpr):
    """Row-wise maximum of ``v`` ``[T, BLOCK_E]`` and its lowest column index (as ``torch.argmax``,
    NaN first: see ``_first_argmax``)."""
    key = tl.where(v != v, float("inf"), v)
    best = tl.max(key, axis=1)
    idx = tl.min(tl.where(key == best[:, None], e[None, :], BLOCK_E), axis=1)
    return tl.where(best == float("inf"), float("nan"), best), idx


@triton.jit
def _row_free_argmax(v, free, e, BLOCK_E: tl.constexpr):
    """Row-wise :func:`_first_free_argmax` of ``v`` ``[T, BLOCK_E]``."""
    key = tl.where(free, tl.where(v != v, float("inf"), v), float("-inf"))
    best = tl.max(key, axis=1)
    idx = tl.min(tl.where((key == best[:, None]) & free, e[None, :], BLOCK_E), axis=1)
    return tl.sum(tl.where(e[None, :] == idx[:, None], v, 0.0), axis=1), idx


@triton.jit
def _large_router_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    logits_ptr,
    index_ptr,
    gates_ptr,
    num_tokens,
    num_experts,
    hidden,
    stride_x,
    eps,
    MODE: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_W: tl.constexpr,
    WIDEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    row = t.to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    dd = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + row[:, None] * stride_x + dd[None, :]  # [BLOCK_T, BLOCK_D]
    w_ptrs = w_ptr + e[None, :] * hidden + dd[:, None]  # [BLOCK_D, BLOCK_E]: W.T
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_D):
        if EVEN_D:
            xv = tl.load(x_ptrs, mask=t_ok[:, None], other=0.0)
            if EVEN_E:
                wv = tl.load(w_ptrs)
            else:
                wv = tl.load(w_ptrs, mask=e_ok[None, :], other=0.0)
        else:
            d_ok = d0 + dd < hidden
            xv = tl.load(x_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            wv = tl.load(w_ptrs, mask=d_ok[:, None] & e_ok[None, :], other=0.0)
        if SPLIT_W:
            # bf16 tokens, float32 weight: W = hi + mid + lo exactly, three exact-product bf16 dots.
            hi = wv.to(tl.bfloat16)
            rest = wv - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            if WIDEN:
                xv = xv.to(tl.float32)
                acc = tl.dot(xv, lo.to(tl.float32), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(xv, mid.to(tl.float32), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(xv, hi.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(xv, lo, acc)
                acc = tl.dot(xv, mid, acc)
                acc = tl.dot(xv, hi, acc)
        elif WIDEN:
            acc = tl.dot(xv.to(tl.float32), wv.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(xv, wv, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    # The logits as stored (rounded to their dtype) are what torch routes on.
    logits = acc.to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row[:, None] * num_experts + e[None, :], logits, mask=t_ok[:, None] & e_ok[None, :])
    logits = tl.where(e_ok[None, :], logits.to(tl.float32), float("-inf"))
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = shifted / tl.sum(shifted, axis=1)[:, None]
    gate_ty = gates_ptr.dtype.element_ty
    if MODE == 2:
        k = tl.arange(0, BLOCK_K)
        weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        left = tl.where(e_ok[None, :], probs, -1.0)
        for i in tl.static_range(TOP_K):
            best, idx = _row_argmax(left, e, BLOCK_E)
            weights = tl.where(k[None, :] == i, best[:, None], weights)
            chosen = tl.where(k[None, :] == i, idx[:, None], chosen)
            left = tl.where(e[None, :] == idx[:, None], -1.0, left)
        if NORMALIZE:
            weights = weights / tl.sum(weights, axis=1)[:, None]
        out = row[:, None] * TOP_K + k[None, :]
        k_ok = t_ok[:, None] & (k[None, :] < TOP_K)
        tl.store(index_ptr + out, chosen.to(tl.int64), mask=k_ok)
        tl.store(gates_ptr + out, weights.to(gate_ty), mask=k_ok)
    elif MODE == 3:
        k = tl.arange(0, BLOCK_K)
        weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        free = e_ok[None, :] & t_ok[:, None]
        for i in tl.static_range(TOP_K):
            best, idx = _row_free_argmax(logits, free, e, BLOCK_E)
            weights = tl.where(k[None, :] == i, _sigmoid(best)[:, None], weights)
            chosen = tl.where(k[None, :] == i, idx[:, None], chosen)
            free = free & (e[None, :] != idx[:, None])
        out = row[:, None] * TOP_K + k[None, :]
        k_ok = t_ok[:, None] & (k[None, :] < TOP_K)
        tl.store(index_ptr + out, chosen.to(tl.int64), mask=k_ok)
        tl.store(gates_ptr + out, weights.to(gate_ty), mask=k_ok)
    else:
        # Switch and NLLB choose on the probabilities rounded to the input (= gates') dtype.
        rounded = tl.where(e_ok[None, :], probs.to(gate_ty).to(tl.float32), -1.0)
        p1, top1 = _row_argmax(rounded, e, BLOCK_E)
        if MODE == 0:
            tl.store(index_ptr + row, top1.to(tl.int64), mask=t_ok)
            tl.store(gates_ptr + row, p1.to(gate_ty), mask=t_ok)
        else:
            _, top2 = _row_argmax(tl.where(e[None, :] == top1[:, None], float("-inf"), logits), e, BLOCK_E)
            p2 = tl.sum(tl.where(e[None, :] == top2[:, None], rounded, 0.0), axis=1)
            # The renormalisation in the input dtype: each operation rounded as torch does.
            denom = tl.maximum((p1 + p2).to(gate_ty).to(tl.float32), eps)
            tl.store(index_ptr + 2 * row, top1.to(tl.int64), mask=t_ok)
            tl.store(index_ptr + 2 * row + 1, top2.to(tl.int64), mask=t_ok)
            tl.store(gates_ptr + 2 * row, (p1 / denom).to(gate_ty), mask=t_ok)
            tl.store(gates_ptr + 2 * row + 1, (p2 / denom).to(gate_ty), mask=t_ok)


class LargeBatchConfig(NamedTuple):
    """Launch parameters of ``_large_router_kernel``: tokens per program, hidden chunk, warps."""

    block_t: int
    block_d: int
    num_warps: int


# Elements of one program's [BLOCK_T, BLOCK_E] fp32 logits tile (32 registers a thread at 8 warps;
# the routing step keeps a few such tiles live), and bytes of one [BLOCK_D, BLOCK_E] weight chunk.
_TILE = 8192
_CHUNK_BYTES = 16384
# Programs below which a smaller token block is taken (about one per SM of an H100 / H200).
_MIN_PROGRAMS = 128


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _MIN_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def large_batch_config(
    num_tokens: int,
    num_experts: int,
    hidden: int,
    device: torch.device,
    operand_bytes: int = 2,
    split: bool = False,
) -> LargeBatchConfig:
    """Tile sizes of the one-launch kernel (``operand_bytes``: the wider of the tokens' and the
    weight's element sizes; ``split``: the three-part split of a float32 weight runs).

    ``BLOCK_T`` tokens per program: as many as keep the ``[BLOCK_T, E_pad]`` fp32 tile at 8192
    elements (128 tokens up to 64 experts, 64 at 128, 32 at 256, 16 at 512), halved (not below 32)
    while the grid would leave SMs idle -- every program streams the whole weight from L2, so
    blocks much smaller than that cost more in weight traffic than they win in parallelism. The split
    redoes its three-way split of the weight in every program: there blocks up to twice as large,
    halved only below half an SM each (H200, switch-base-128's float32 router at 16384 tokens:
    33 us against 89 us with the 16-bit rule). ``BLOCK_D``: the hidden chunk of one dot,
    ``[BLOCK_D, E_pad]`` weight and ``[BLOCK_T, BLOCK_D]`` token chunks of at most 16 KiB each
    (64 at 128 experts in 16 bits, 32 in float32, 16 from 512 experts). Warps: 4 for 16-bit dots
    (H200: 6-20% faster than 8 at 4096-16384 tokens), else 8 where the token block times
    ``max(E_pad, BLOCK_D)`` reaches 2048.
    """
    block_e = max(next_power_of_2(num_experts), 16)
    tile = 2 * _TILE if split else _TILE
    block_t = max(16, min(128, tile // block_e))
    min_programs = max(_num_sms(device) // (2 if split else 1), 1)
    while block_t > 32 and cdiv(num_tokens, block_t) < min_programs:
        block_t //= 2
    chunk = _CHUNK_BYTES // (max(block_e, block_t) * operand_bytes)
    block_d = max(16, min(64, chunk, next_power_of_2(hidden)))
    if operand_bytes == 2:
        return LargeBatchConfig(block_t, block_d, 4)
    return LargeBatchConfig(block_t, block_d, 8 if block_t * max(block_e, block_d) >= 2048 else 4)


def _dot_mode(x_dtype: torch.dtype, w_dtype: torch.dtype, interpreted: bool) -> tuple[bool, bool, str | None]:
    """``(SPLIT_W, WIDEN, DOT_PRECISION)`` of the large-batch dot (see the module docstring)."""
    split = x_dtype == torch.bfloat16 and w_dtype == torch.float32
    if interpreted:
        return split, True, "ieee"
    if split or x_dtype == w_dtype != torch.float32:
        return split, False, None
    sixteen = x_dtype != torch.float32 and w_dtype != torch.float32
    return False, True, "tf32" if sixteen else "tf32x3"


def fits(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether :func:`fused_router` handles this batch (any token count; up to :data:`MAX_EXPERTS`
    experts and :data:`MAX_TOP_K` choices)."""
    return 0 < num_tokens and 1 < num_experts <= MAX_EXPERTS and 0 < top_k <= min(MAX_TOP_K, num_experts)


def fused_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mode: str,
    top_k: int | None = None,
    logits_dtype: torch.dtype,
    gates_dtype: torch.dtype,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[N, E]``, expert indices ``[N, k]`` (int64) and gates ``[N, k]`` of tokens ``x`` ``[N, D]``.

    Up to :data:`MAX_TOKENS` tokens: two launches (GEMV logits, then one routing program per token);
    more: one launch of the tiled kernel (:func:`large_batch_config`).

    Args:
        x: the tokens; ``weight``: the router's ``[E, D]`` weight (any float dtype; its values are
            used exactly); ``bias``: ``[E]`` or None.
        mode: ``"switch"`` (k = 1), ``"nllb"`` (k = 2), ``"softmax_topk"`` or ``"topk_sigmoid"``
            (k = ``top_k``).
        logits_dtype: dtype the logits are rounded to (the router dtype of Switch/NLLB, the model
            dtype of the softmax-top-k families).
        gates_dtype: the input dtype (Switch/NLLB; the probabilities are rounded to it before the
            choice) or the weights' dtype (softmax-top-k).
        normalize: softmax-top-k only: renormalise the k weights to sum to 1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(MODES)}")
    k = FIXED_TOP_K.get(mode, top_k)
    if k is None:
        raise ValueError(f"mode {mode!r} needs top_k")
    if top_k is not None and top_k != k:
        raise ValueError(f"mode {mode!r} routes to {k} expert(s), got top_k={top_k}")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if weight.shape != (num_experts, hidden) or (bias is not None and bias.shape != (num_experts,)):
        raise ValueError(f"router weight {tuple(weight.shape)} / bias do not match tokens of width {hidden}")
    if not fits(num_tokens, num_experts, k):
        raise ValueError(f"fused_router handles 1+ tokens, 2..{MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    device = x.device
    logits = torch.empty(num_tokens, num_experts, dtype=logits_dtype, device=device)
    index = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    gates = torch.empty(num_tokens, k, dtype=gates_dtype, device=device)
    bias_arg = bias if bias is not None else weight  # placeholder, never read
    block_e = max(next_power_of_2(num_experts), 16)
    block_k = max(next_power_of_2(k), 2)
    pdl = launch_options(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if num_tokens > MAX_TOKENS:
            operand_bytes = max(x.element_size(), weight.element_size())
            split_w, widen, precision = _dot_mode(x.dtype, weight.dtype, kernels_interpreted())
            config = large_batch_config(num_tokens, num_experts, hidden, device, operand_bytes, split_w)
            launch(
                _large_router_kernel,
                (cdiv(num_tokens, config.block_t),),
                x,
                weight,
                bias_arg,
                logits,
                index,
                gates,
                num_tokens,
                num_experts,
                hidden,
                x.stride(0),
                torch.finfo(gates_dtype).eps,
                MODE=MODES[mode],
                TOP_K=k,
                NORMALIZE=normalize,
                HAS_BIAS=bias is not None,
                SPLIT_W=split_w,
                WIDEN=widen,
                DOT_PRECISION=precision,
                EVEN_D=hidden % config.block_d == 0,
                EVEN_E=num_experts == block_e,
                BLOCK_T=config.block_t,
                BLOCK_E=block_e,
                BLOCK_D=config.block_d,
                BLOCK_K=block_k,
                num_warps=config.num_warps,
                **pdl,
            )
            return logits, index, gates
        small_block_e = 8 if num_experts <= 256 else 16
        block_d = min(next_power_of_2(hidden), 8192 // small_block_e)
        launch(
            _logits_kernel,
            (num_tokens, cdiv(num_experts, small_block_e)),
            x,
            weight,
            bias_arg,
            logits,
            num_experts,
            hidden,
            x.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_E=small_block_e,
            BLOCK_D=block_d,
            num_warps=8 if small_block_e * block_d >= 8192 else 4,
            **pdl,
        )
        launch(
            _route_kernel,
            (num_tokens,),
            logits,
            index,
            gates,
            num_experts,
            torch.finfo(gates_dtype).eps,
            MODE=MODES[mode],
            TOP_K=k,
            NORMALIZE=normalize,
            BLOCK_E=block_e,
            BLOCK_K=block_k,
            num_warps=4,
            **pdl,
        )
    return logits, index, gates


def router_supported(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the tokens, router weight and requested dtypes suit the kernels."""
    return (
        x.dim() == 2
        and x.device == weight.device
        and x.dtype in _DTYPES
        and weight.dtype in _DTYPES
        and all(d in _DTYPES for d in dtypes)
    )
