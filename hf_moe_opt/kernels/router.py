"""The router of a small batch in two Triton launches (decode steps).

In torch a router is a cast, a GEMV (two cuBLAS kernels), a softmax, another cast, an arg-max or a
top-k and a gather: seven launches that cost more than they compute when a decode step routes a few
tokens. Here:

* ``_logits_kernel`` -- ``logits = x @ W.T (+ b)`` with fp32 products and accumulation of the
  values as stored (a bf16 weight upcast in registers is exactly the float32 copy torch would make),
  rounded to the logits' dtype; a grid over tokens x expert blocks, so the weight is streamed by
  many programs;
* ``_route_kernel`` -- one program per token: softmax in float32 and the family's choice.

Modes (the semantics of :mod:`hf_moe_opt.routing`, same dtypes at every step):

* ``switch`` -- top-1 on the probabilities cast to the input dtype, gate = that probability;
* ``nllb`` -- top-1 as Switch, second expert = arg-max of the logits with the first masked, both
  probabilities renormalised in the input dtype (the no-drop case: policy "all", no padding, no
  binding capacity);
* ``softmax_topk`` -- Mixtral / Qwen-MoE / OLMoE: top-k of the float32 probabilities (descending,
  ties to the lower expert), optionally renormalised, cast to the weights' dtype.

Results equal the torch routers' up to the order of the GEMV's sums (last-bit differences in the
logits; a choice can differ only where two experts' scores tie to that precision).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MODES = {"switch": 0, "nllb": 1, "softmax_topk": 2}
# Experts per token of the modes whose k is fixed.
FIXED_TOP_K = {"switch": 1, "nllb": 2}
# Largest batch and expert count routed here; larger batches are better served by cuBLAS.
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
):
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
    """Value and lowest index of the maximum of ``v`` (as ``torch.argmax``)."""
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best, e, BLOCK_E), axis=0)


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
):
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


def fits(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether :func:`fused_router` handles this batch."""
    return 0 < num_tokens <= MAX_TOKENS and 1 < num_experts <= MAX_EXPERTS and 0 < top_k <= min(MAX_TOP_K, num_experts)


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

    Args:
        x: the tokens; ``weight``: the router's ``[E, D]`` weight (any float dtype; its values are
            used exactly); ``bias``: ``[E]`` or None.
        mode: ``"switch"`` (k = 1), ``"nllb"`` (k = 2) or ``"softmax_topk"`` (k = ``top_k``).
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
        raise ValueError("mode 'softmax_topk' needs top_k")
    if top_k is not None and top_k != k:
        raise ValueError(f"mode {mode!r} routes to {k} expert(s), got top_k={top_k}")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if weight.shape != (num_experts, hidden) or (bias is not None and bias.shape != (num_experts,)):
        raise ValueError(f"router weight {tuple(weight.shape)} / bias do not match tokens of width {hidden}")
    if not fits(num_tokens, num_experts, k):
        raise ValueError(
            f"fused_router handles 1..{MAX_TOKENS} tokens, 2..{MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    device = x.device
    logits = torch.empty(num_tokens, num_experts, dtype=logits_dtype, device=device)
    index = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    gates = torch.empty(num_tokens, k, dtype=gates_dtype, device=device)
    block_e = 8 if num_experts <= 256 else 16
    block_d = min(triton.next_power_of_2(hidden), 8192 // block_e)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _logits_kernel[(num_tokens, triton.cdiv(num_experts, block_e))](
            x,
            weight,
            bias if bias is not None else weight,  # placeholder, never read
            logits,
            num_experts,
            hidden,
            x.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_E=block_e,
            BLOCK_D=block_d,
            num_warps=8 if block_e * block_d >= 8192 else 4,
        )
        _route_kernel[(num_tokens,)](
            logits,
            index,
            gates,
            num_experts,
            torch.finfo(gates_dtype).eps,
            MODE=MODES[mode],
            TOP_K=k,
            NORMALIZE=normalize,
            BLOCK_E=max(triton.next_power_of_2(num_experts), 16),
            BLOCK_K=max(triton.next_power_of_2(k), 2),
            num_warps=4,
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
