"""Expert compute in plain PyTorch: gather -> grouped GEMM -> act -> grouped GEMM -> weighted combine.

Uses ``torch._grouped_mm`` over the dispatch plan's offsets where the installed torch supports it for
the device, dtype and shape (no host sync, capturable in a CUDA graph). Elsewhere it falls back to a
loop over experts, which reads the group sizes on the host.
"""

from __future__ import annotations

import torch

from ..dispatch import DispatchPlan
from .activation import Activation

_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, k: int, n: int) -> bool:
    """Whether ``torch._grouped_mm`` runs here for ``[M, k] @ [G, k, n]`` (probed once, then cached)."""
    key = (device.type, device.index, dtype, k, n)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.zeros(4, k, device=device, dtype=dtype)
                b = torch.zeros(2, n, k, device=device, dtype=dtype).transpose(1, 2)
                offs = torch.tensor([2, 4], device=device, dtype=torch.int32)
                torch._grouped_mm(a, b, offs=offs)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


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
    multiply happens in the expert's output dtype and the sum in ``x.dtype``.
    """
    num_tokens, top_k = plan.num_tokens, plan.top_k
    rows = x[plan.token].to(w1.dtype)
    use_grouped = grouped_mm_supported(x.device, w1.dtype, w1.shape[2], w1.shape[1]) and grouped_mm_supported(
        x.device, w2.dtype, w2.shape[2], w2.shape[1]
    )
    expert = plan.expert.clamp(max=plan.num_experts - 1)
    h = _grouped_linear(rows, w1, plan, use_grouped)
    if b1 is not None:
        h = h + b1[expert]
    h = activation.fn(h).to(w2.dtype)
    y = _grouped_linear(h, w2, plan, use_grouped)
    if b2 is not None:
        y = y + b2[expert]
    y = y * plan.gate[:, None].to(y.dtype) if y.dtype != plan.gate.dtype else y * plan.gate[:, None]
    if out_scale != 1.0:
        y = y * out_scale
    # Dropped rows hold whatever the GEMM left there (possibly NaN): select, never multiply, them away.
    y = torch.where(plan.kept_rows()[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device)).to(x.dtype)
    if top_k == 1:
        out = torch.empty_like(y)
        out[plan.order] = y
        return out
    # Unsort into [N, k, D] (a permutation: deterministic), then sum the k slots in a fixed order.
    slots = torch.empty((num_tokens * top_k, y.shape[1]), dtype=y.dtype, device=y.device)
    slots[plan.order] = y
    return slots.view(num_tokens, top_k, -1).sum(dim=1)
