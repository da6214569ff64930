"""A weight-streaming read for the bandwidth ceiling.

The expert kernels stream weights and write little. On an H200 they read faster (4.3-4.4 TB/s at
small batches) than a device copy moves bytes (read + write, 3.9-4.1 TB/s) or than torch's sum and
matrix-vector product read (3.6-3.7 TB/s), so a floor built on those rates can be beaten. This
probe times the plan-free decode kernel on one token routed to a few large experts: the same
loads, over 1 GiB, with nothing else to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

EXPERTS, HIDDEN, FFN = 4, 4096, 16384  # 4 x 2 x 4096 x 16384 bf16 = 1 GiB
CALLS = 5  # per timing, so the launch is a small part


def probe_inputs(device: torch.device, experts: int = EXPERTS, hidden: int = HIDDEN, ffn: int = FFN) -> tuple:
    """One token routed to every expert, bf16: the arguments of ``gemv_moe_ffn`` and the bytes it reads."""
    from ..experts.activation import Activation

    w1 = torch.full((experts, ffn, hidden), 1e-3, dtype=torch.bfloat16, device=device)
    w2 = torch.full((experts, hidden, ffn), 1e-3, dtype=torch.bfloat16, device=device)
    x = torch.ones(1, hidden, dtype=torch.bfloat16, device=device)
    index = torch.arange(experts, device=device).view(1, experts)
    gates = torch.full((1, experts), 1.0 / experts, dtype=torch.bfloat16, device=device)
    args = (x, index, gates, None, w1, None, w2, None, Activation("relu", torch.relu))
    return args, w1.numel() * w1.element_size() + w2.numel() * w2.element_size()


def read_rates(device: torch.device, time_ms: Callable[[Callable[[], object]], float]) -> list[float]:
    """Bytes per second the decode kernel streams (one rate), timed by ``time_ms(fn)``; empty off
    CUDA or without the compiled kernels (the interpreter is no probe)."""
    from ..kernels import kernels_interpreted

    if torch.device(device).type != "cuda" or kernels_interpreted():
        return []
    try:
        from ..kernels.gemv import gemv_moe_ffn
    except ImportError:  # no triton
        return []

    def calls() -> None:
        for _ in range(CALLS):
            gemv_moe_ffn(*args)

    try:
        args, nbytes = probe_inputs(device)
        return [CALLS * nbytes / (time_ms(calls) * 1e-3)]
    except (RuntimeError, ValueError) as err:  # e.g. out of memory: the other streams still count
        warnings.warn(f"the decode-kernel bandwidth probe did not run ({type(err).__name__}: {err})", stacklevel=2)
        return []
