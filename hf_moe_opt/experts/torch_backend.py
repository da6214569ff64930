"""Expert compute in plain PyTorch: gather -> grouped GEMM -> act -> grouped GEMM -> weighted combine.

Uses ``torch._grouped_mm`` over the dispatch plan's offsets where the installed torch supports it for
the device, dtype, shape and weight layout (no host sync, capturable in a CUDA graph). Elsewhere it
falls back to a loop over experts, which reads the group sizes on the host.

Weights come as ``[E, out, in]`` tensors (``nn.Linear`` layout); they may be views, e.g. the transpose
of a transformers fused ``[E, in, out]`` parameter, and are never copied. Gated (GLU) experts pass
their fused gate/up projection as ``w1`` (``[E, 2F, D]``) and a gated :class:`Activation`.
"""

from __future__ import annotations

import torch

from ..dispatch import DispatchPlan
from ..host_sync import HostReadError
from .activation import Activation

_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, k: int, n: int, row_major: bool = False) -> bool:
    """Whether ``torch._grouped_mm`` runs here for ``[M, k] @ [G, k, n]`` (probed once, then cached).

    ``row_major``: the ``[G, k, n]`` operand is contiguous (a transformers ``[E, in, out]`` parameter)
    rather than the transpose of a contiguous ``[G, n, k]`` (``nn.Linear`` layout).
    """
    key = (device.type, device.index, dtype, k, n, row_major)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.zeros(4, k, device=device, dtype=dtype)
                if row_major:
                    b = torch.zeros(2, k, n, device=device, dtype=dtype)
                else:
                    b = torch.zeros(2, n, k, device=device, dtype=dtype).transpose(1, 2)
                # Made on the device: the probe may first run inside a graph capture (no host data).
                offs = torch.arange(2, 5, 2, device=device, dtype=torch.int32)
                torch._grouped_mm(a, b, offs=offs)
            except HostReadError:
                raise  # says nothing about support: never cached as "unsupported"
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _layout_supported(device: torch.device, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``weight`` (``[E, out, in]``, possibly a transposed view) as it is."""
    _, n, k = weight.shape
    if weight.stride(2) == 1 and weight.stride(1) == k and weight.stride(0) == n * k:
        return grouped_mm_supported(device, weight.dtype, k, n)
    if weight.stride(1) == 1 and weight.stride(2) == n and weight.stride(0) == n * k:
        return grouped_mm_supported(device, weight.dtype, k, n, row_major=True)
    return False


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan, use_grouped: bool) -> torch.Tensor:
    """``rows[i] @ weight[expert_i].T`` for the kept rows; rows of dropped assignments are left undefined."""
    if use_grouped:
        return torch._grouped_mm(rows, weight.transpose(1, 2), offs=plan.offsets)
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    ends = plan.offsets.tolist()  # host sync: fallback path only
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = rows[start:end] @ weight[e].T
        start = end
    return out


def torch_moe_ffn(
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

    Rounding follows HF's expert modules: each matmul's result is in its weight's dtype, the gate
    multiply happens in the promoted dtype of the expert output and the gate (a float32 gate on bf16
    experts multiplies in float32, as transformers' Mixtral/DeepSeek experts do) and the sum in
    ``x.dtype``.
    """
    num_tokens, top_k = plan.num_tokens, plan.top_k
    rows = x[plan.token].to(w1.dtype)
    if plan.may_drop and rows.requires_grad:
        # The grouped GEMMs' backward leaves the dropped rows' input gradient undefined, as their forward
        # leaves their output: select it away before it reaches the tokens.
        rows = torch.where(plan.kept_rows()[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    use_grouped = _layout_supported(x.device, w1) and _layout_supported(x.device, w2)
    expert = plan.expert.clamp(max=plan.num_experts - 1)
    h = _grouped_linear(rows, w1, plan, use_grouped)
    if b1 is not None:
        h = h + b1[expert]
    h = activation.apply(h).to(w2.dtype)
    y = _grouped_linear(h, w2, plan, use_grouped)
    if b2 is not None:
        y = y + b2[expert]
    y = y * plan.gate[:, None]
    if out_scale != 1.0:
        y = y * out_scale
    # Dropped rows hold whatever the GEMM left there (possibly NaN): select, never multiply, them away.
    if plan.may_drop:
        y = torch.where(plan.kept_rows()[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    y = y.to(x.dtype)
    if top_k == 1:
        out = torch.empty_like(y)
        out[plan.order] = y
        return out
    # Unsort into [N, k, D] (a permutation: deterministic), then sum the k slots in a fixed order.
    slots = torch.empty((num_tokens * top_k, y.shape[1]), dtype=y.dtype, device=y.device)
    slots[plan.order] = y
    return slots.view(num_tokens, top_k, y.shape[1]).sum(dim=1)  # not -1: num_tokens may be 0
