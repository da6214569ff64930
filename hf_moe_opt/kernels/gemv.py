"""Experts of a decode step as matrix-vector products, straight from the router's choices.

With one token the dispatch plan (a sort by expert) and tensor-core tiles buy nothing: each of the
token's ``k`` experts is read once whatever the order, and a 16-row ``tl.dot`` tile holds one real
row. Here two kernels run the experts without a plan:

* ``_gemv_act_kernel`` -- one program per (assignment, block of ``F`` columns):
  ``h[a] = act(x[a // k] @ w1[e_a].T + b1[e_a])``, fp32 sums, ``h`` in ``w2``'s dtype;
* ``_gemv_combine_kernel`` -- one program per (token, block of ``D`` columns): the token's ``k``
  slots ``gate * out_scale * (h[a] @ w2[e_a].T + b2[e_a])``, each rounded to the output dtype as the
  plan path stores it, summed in fp32 in slot order (deterministic), rounded once.

Small column blocks keep enough programs in flight to stream the weights at memory speed, and no
split-K partials or combine kernels are needed: a decode step's experts take two launches. Used by
the layer for at most :data:`MAX_TOKENS` tokens with resident experts, and by an expert cache over
its slots (``slot_map``: the kernels read each expert's slot from the cache's device table).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2
from .moe_ffn import KernelActivation, _activate, _glu, check_expert_shapes, kernels_interpreted, weight_strides
from .pdl import launch_options, wait_for_producer

# Above this many tokens, experts shared by several tokens would be read once per token here; the
# plan path reads each once.
MAX_TOKENS = 1
# Elements of one weight tile per program and loop step (16 KiB of bf16), warps per program, weight
# bytes per program (more programs in flight for large experts) and software-pipelined loop stages:
# the best mix of an H200 sweep over switch-base-128 to Mixtral-8x7B shapes (benchmarks/results/gemv_ab_h200.log).
_TILE = 8192
_NUM_WARPS = 8
_BYTES_PER_PROGRAM = 1 << 16
_MIN_PROGRAMS = 256
_LOOP_STAGES = 3
# Column block for weights stored ``[E, in, out]`` (Llama 4, GPT-OSS: ``x @ W``), whose columns are
# contiguous: the blocks above would load 4-8 contiguous elements per row of a tile (a fraction of
# a memory sector); this many make each row of a tile whole sectors, in tiles of _CONTIGUOUS_TILE
# elements (best of an H200 probe, benchmarks/results/probe_gemv_layout_tiles_h200.log). 0 turns it off.
_CONTIGUOUS_BLOCK_N = 32
_CONTIGUOUS_TILE = 16384
# The CPU interpreter runs programs one after another: fewer, wider ones (tests only).
_INTERPRETED = kernels_interpreted()


@triton.jit
def _expert_offset(off_ptr, e, ALIGNED: tl.constexpr):
    """Element offset of expert ``e``'s weights from the tensor the kernel was given (a slot, or the
    expert's pinned host copy, which the GPU reads over the host link under unified addressing)."""
    off = tl.load(off_ptr + e)
    if ALIGNED:  # every offset is a multiple of 8 elements; written so, the compiler knows it and
        off = (off // 8) * 8  # keeps the weight loads vectorised (a no-op on the value)
    return off


@triton.jit
def _gemv_act_kernel(
    x_ptr,
    index_ptr,
    map_ptr,
    keep_ptr,
    w_ptr,
    b_ptr,
    w_off_ptr,
    b_off_ptr,
    h_ptr,
    N,
    K,
    row_mul,
    up_offset,
    alpha,
    limit,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_hm,
    TOP_K: tl.constexpr,
    HAS_MAP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    a = tl.program_id(0)
    if HAS_KEEP:
        if tl.load(keep_ptr + a) == 0:  # dropped: its row of h is never read
            return
    e = tl.load(index_ptr + a)
    if HAS_OFFSETS:  # expert id -> where its weights are, in elements from w_ptr / b_ptr
        w_base = w_ptr + _expert_offset(w_off_ptr, e, ALIGNED)
    else:
        if HAS_MAP:  # expert id -> the slot holding it (expert caches)
            e = tl.load(map_ptr + e)
        e = e.to(tl.int64)
        w_base = w_ptr + e * stride_we
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    gate_rows = offs_n * row_mul
    x_row = x_ptr + (a // TOP_K).to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)
        mask_w = mask_n[:, None] & mask_k[None, :]
        w_ptrs = w_base + gate_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=mask_w, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
        if GLU != "none":
            u = tl.load(w_ptrs + up_offset * stride_wn, mask=mask_w, other=0.0).to(tl.float32)
            acc_up += tl.sum(u * xv[None, :], axis=1)
    if HAS_BIAS:
        if HAS_OFFSETS:
            b_base = b_ptr + _expert_offset(b_off_ptr, e, False)
        else:
            b_base = b_ptr + e * stride_be
        acc += tl.load(b_base + gate_rows * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
        if GLU != "none":
            acc_up += tl.load(b_base + (gate_rows + up_offset) * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
    if GLU != "none":
        acc = _glu(acc, acc_up, alpha, limit, ACTIVATION, GLU)
    else:
        acc = _activate(acc, ACTIVATION)
    tl.store(h_ptr + a.to(tl.int64) * stride_hm + offs_n, acc.to(h_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_combine_kernel(
    h_ptr,
    index_ptr,
    map_ptr,
    gates_ptr,
    keep_ptr,
    w_ptr,
    b_ptr,
    w_off_ptr,
    b_off_ptr,
    out_ptr,
    out_scale,
    N,
    K,
    stride_hm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_om,
    TOP_K: tl.constexpr,
    HAS_MAP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out_ty = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = t * TOP_K + j
        kept = True
        if HAS_KEEP:
            kept = tl.load(keep_ptr + a) != 0
        if kept:  # a dropped slot contributes exactly 0
            e = tl.load(index_ptr + a)
            if HAS_OFFSETS:
                w_base = w_ptr + _expert_offset(w_off_ptr, e, ALIGNED)
            else:
                if HAS_MAP:
                    e = tl.load(map_ptr + e)
                e = e.to(tl.int64)
                w_base = w_ptr + e * stride_we
            h_row = h_ptr + a.to(tl.int64) * stride_hm
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                hv = tl.load(h_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                w_ptrs = w_base + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * hv[None, :], axis=1)
            if HAS_BIAS:
                if HAS_OFFSETS:
                    b_base = b_ptr + _expert_offset(b_off_ptr, e, False)
                else:
                    b_base = b_ptr + e * stride_be
                acc += tl.load(b_base + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
            gate = tl.load(gates_ptr + a).to(tl.float32) * out_scale
            # Each slot rounded to the output dtype, as the plan path's slots are.
            total += (acc * gate).to(out_ty).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_n, total.to(out_ty), mask=mask_n)


@dataclass(frozen=True)
class ExpertOffsets:
    """Where each expert's weights are, as element offsets from the tensors the kernels are given.

    ``w1``, ``w2`` (and ``b1``, ``b2`` for biased experts, else None): 1-D int64 tensors on the
    compute device, one entry per expert id (``E + 1`` entries: entry ``E``, a dropped assignment's
    id, is never read). Entry ``e`` of ``w1`` is the offset, in elements, of expert ``e``'s ``[F, D]``
    matrix from ``w1[0]``: ``s * w1.stride(0)`` for slot ``s``, or the distance to its copy in
    pinned host memory, which the GPU reads over the host link (unified addressing). ``aligned``:
    every weight offset is a multiple of 8 elements (lets the kernels keep vectorised loads).
    """

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    aligned: bool = False

    @property
    def w1_b1(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w1, self.b1 if self.b1 is not None else self.w1

    @property
    def w2_b2(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w2, self.b2 if self.b2 is not None else self.w2

    def check(self, device: torch.device, has_b1: bool, has_b2: bool) -> None:
        """Raise ValueError unless these tables fit experts with (or without) biases on ``device``."""
        for name, t, wanted in (("w1", self.w1, True), ("b1", self.b1, has_b1), ("w2", self.w2, True),
                                ("b2", self.b2, has_b2)):  # fmt: skip
            if (t is not None) != wanted:
                raise ValueError(f"offsets.{name} must be {'given' if wanted else 'None'} for these experts")
            if t is not None and (t.dim() != 1 or t.dtype != torch.int64 or t.device != device):
                raise ValueError(
                    f"offsets.{name} must be a 1-D int64 tensor on {device}, got {t.dtype} {tuple(t.shape)} "
                    f"on {t.device}"
                )


def fits(num_tokens: int, limit: int | None = None) -> bool:
    """Whether :func:`gemv_moe_ffn` serves a batch of ``num_tokens`` tokens (at most ``limit``, by
    default :data:`MAX_TOKENS`; an expert cache reading from host memory inside a graph takes more)."""
    return 0 < num_tokens <= (MAX_TOKENS if limit is None else limit)


def _blocks(columns: int, depth: int, rows: int, item_bytes: int, columns_contiguous: bool = False) -> tuple[int, int]:
    """Column and depth blocks: enough programs to keep loads in flight, tiles of about ``_TILE``
    elements; with ``columns_contiguous`` (``[E, in, out]`` storage) column blocks wide enough for
    whole memory sectors."""
    if columns_contiguous and _CONTIGUOUS_BLOCK_N:
        block_n = min(next_power_of_2(columns), _CONTIGUOUS_BLOCK_N)
        return block_n, min(next_power_of_2(depth), max(_CONTIGUOUS_TILE // block_n, 16))
    weight_bytes = columns * depth * rows * item_bytes
    programs = max(_MIN_PROGRAMS, weight_bytes // _BYTES_PER_PROGRAM)
    block_n = next_power_of_2(max(columns * rows // programs, 1))
    block_n = min(max(block_n, 4), 64)
    block_k = min(next_power_of_2(depth), max(_TILE // block_n, 32))
    if _INTERPRETED:  # one program per row where it fits: each column's sums stay exactly as they are
        block_n = min(max(next_power_of_2(columns), block_n), 64)
    return block_n, block_k


def gemv_moe_ffn(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    gates: torch.Tensor,
    keep: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation,
    out_scale: float = 1.0,
    slot_map: torch.Tensor | None = None,
    offsets: ExpertOffsets | None = None,
) -> torch.Tensor:
    """``out[n] = sum_k gate * out_scale * expert(x[n])`` for a few tokens, without a dispatch plan.

    Args are those of ``moe_ffn`` with the router's ``[N, k]`` choices, gates and keep mask (None:
    nothing dropped) in place of the plan. The activation and dtypes must be kernel-supported
    (:func:`hf_moe_opt.kernels.kernel_supported`). ``slot_map`` (1-D integers on the tokens' device):
    kept assignment ``a`` reads the experts' entry ``slot_map[expert_index[a]]`` instead of
    ``expert_index[a]``; an expert cache passes its slot table, so the lookup costs no launch.
    ``offsets`` (instead of ``slot_map``): expert ``e``'s weights are read ``offsets.w1[e]`` elements
    from ``w1``'s first expert (``w2``, ``b1``, ``b2`` likewise), wherever they are: in a slot or in
    the pinned host copy (see :class:`ExpertOffsets`).
    """
    num_tokens, top_k = expert_index.shape
    hidden, ffn = w2.shape[1], w2.shape[2]
    if gates.shape != expert_index.shape or (keep is not None and keep.shape != expert_index.shape):
        raise ValueError("expert_index, gates and keep must have the same [tokens, top_k] shape")
    if x.shape != (num_tokens, hidden) or w1.shape[2] != hidden:
        raise ValueError(f"tokens {tuple(x.shape)} do not match experts of width {hidden}")
    kernel_act = KernelActivation.of(activation, ffn)
    if kernel_act is None:
        raise ValueError(f"the Triton kernels do not implement activation {activation.name!r}")
    check_expert_shapes(x, w1, b1, w2, b2, kernel_act)
    if slot_map is not None and (
        slot_map.dim() != 1
        or slot_map.numel() == 0
        or slot_map.device != x.device
        or slot_map.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"slot_map must be a non-empty 1-D int32/int64 tensor on {x.device}, got "
            f"{slot_map.dtype} {tuple(slot_map.shape)} on {slot_map.device}"
        )
    if offsets is not None:
        if slot_map is not None:
            raise ValueError("pass slot_map or offsets, not both")
        offsets.check(x.device, b1 is not None, b2 is not None)
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    num_rows = num_tokens * top_k
    h = torch.empty((num_rows, ffn), dtype=w2.dtype, device=x.device)
    index = expert_index.contiguous().view(-1)
    flat_gates = gates.contiguous().view(-1)
    keep_arg = keep.contiguous().view(-1).view(torch.uint8) if keep is not None else index  # placeholder, never read
    if x.stride(1) != 1:
        x = x.contiguous()
    pdl = launch_options(x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        block_n, block_k = _blocks(w1.shape[1], hidden, num_rows, w1.element_size(), w1.stride(1) == 1)
        launch(
            _gemv_act_kernel,
            (num_rows, cdiv(ffn, block_n)),
            x,
            index,
            slot_map if slot_map is not None else index,  # placeholder, never read
            keep_arg,
            w1,
            b1 if b1 is not None else w1,  # placeholder, never read
            *(offsets.w1_b1 if offsets is not None else (index, index)),  # placeholders, never read
            h,
            ffn,
            hidden,
            kernel_act.row_mul,
            kernel_act.up_offset,
            kernel_act.alpha,
            kernel_act.limit,
            x.stride(0),
            *weight_strides(w1, b1),
            h.stride(0),
            TOP_K=top_k,
            HAS_MAP=slot_map is not None,
            HAS_OFFSETS=offsets is not None,
            ALIGNED=offsets is not None and offsets.aligned,
            HAS_KEEP=keep is not None,
            HAS_BIAS=b1 is not None,
            ACTIVATION=kernel_act.name,
            GLU=kernel_act.glu,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            LOOP_STAGES=_LOOP_STAGES,
            num_warps=_NUM_WARPS,
            **pdl,
        )
        block_n, block_k = _blocks(hidden, ffn * top_k, num_tokens, w2.element_size(), w2.stride(1) == 1)
        launch(
            _gemv_combine_kernel,
            (num_tokens, cdiv(hidden, block_n)),
            h,
            index,
            slot_map if slot_map is not None else index,  # placeholder, never read
            flat_gates,
            keep_arg,
            w2,
            b2 if b2 is not None else w2,  # placeholder, never read
            *(offsets.w2_b2 if offsets is not None else (index, index)),  # placeholders, never read
            out,
            float(out_scale),
            hidden,
            ffn,
            h.stride(0),
            *weight_strides(w2, b2),
            out.stride(0),
            TOP_K=top_k,
            HAS_MAP=slot_map is not None,
            HAS_OFFSETS=offsets is not None,
            ALIGNED=offsets is not None and offsets.aligned,
            HAS_KEEP=keep is not None,
            HAS_BIAS=b2 is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            LOOP_STAGES=_LOOP_STAGES,
            num_warps=_NUM_WARPS,
            **pdl,
        )
    return out
