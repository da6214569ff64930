"""Weight-streaming reads for the bandwidth ceiling.

The expert kernels stream weights and write little. On an H200 they read faster (4.3-4.6 TB/s for
nllb-moe-54b-sized experts at 64-512 tokens) than a device copy moves bytes (read + write, 3.9-4.1
TB/s) or than torch's sum and matrix-vector product read (3.6-3.7 TB/s), so a floor built on those
rates can be beaten. These probes time our own kernels on bf16 weights (1-2 GiB), captured in a
CUDA graph (no host launch in the timing), with almost nothing else to do:

* ``decode``: the plan-free decode kernel, one token routed to a few large experts (4.26-4.38 TB/s
  on the H200; 3.8-4.2 timed without a graph, host launches included);
* ``grouped``: the grouped kernel on experts of nllb-moe-54b's size, a few rows each, the regime
  where the expert kernels read fastest (4.33-4.34 TB/s).

A probe that runs our kernels is no proof of what the memory can do; it only makes sure no floor
sits below a rate we have already reached.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

EXPERTS, HIDDEN, FFN = 4, 4096, 16384  # decode probe: 4 x 2 x 4096 x 16384 bf16 = 1 GiB
GROUPED_EXPERTS, GROUPED_HIDDEN, GROUPED_FFN, GROUPED_ROWS = 32, 2048, 8192, 8  # 32 x 2 x 2048 x 8192 = 2 GiB
CALLS = 5  # per CUDA graph replay


def _weights(experts: int, hidden: int, ffn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    w1 = torch.full((experts, ffn, hidden), 1e-3, dtype=torch.bfloat16, device=device)
    w2 = torch.full((experts, hidden, ffn), 1e-3, dtype=torch.bfloat16, device=device)
    return w1, w2, w1.numel() * w1.element_size() + w2.numel() * w2.element_size()


def _relu():
    from ..experts.activation import Activation

    return Activation("relu", torch.relu)


def probe_inputs(device: torch.device, experts: int = EXPERTS, hidden: int = HIDDEN, ffn: int = FFN) -> tuple:
    """One token routed to every expert, bf16: the arguments of ``gemv_moe_ffn`` and the bytes it reads."""
    w1, w2, nbytes = _weights(experts, hidden, ffn, device)
    x = torch.ones(1, hidden, dtype=torch.bfloat16, device=device)
    index = torch.arange(experts, device=device).view(1, experts)
    gates = torch.full((1, experts), 1.0 / experts, dtype=torch.bfloat16, device=device)
    return (x, index, gates, None, w1, None, w2, None, _relu()), nbytes


def grouped_probe_inputs(
    device: torch.device,
    experts: int = GROUPED_EXPERTS,
    hidden: int = GROUPED_HIDDEN,
    ffn: int = GROUPED_FFN,
    rows: int = GROUPED_ROWS,
) -> tuple:
    """``rows`` tokens on each expert (top-1), bf16: the arguments of ``moe_ffn`` and the weight bytes
    it reads."""
    from ..dispatch import make_plan

    w1, w2, nbytes = _weights(experts, hidden, ffn, device)
    tokens = experts * rows
    x = torch.ones(tokens, hidden, dtype=torch.bfloat16, device=device)
    index = (torch.arange(tokens, device=device) % experts).view(tokens, 1)
    gates = torch.ones(tokens, 1, dtype=torch.bfloat16, device=device)
    plan = make_plan(index, gates, None, experts)
    return (x, plan, w1, None, w2, None, _relu()), nbytes


def read_rates(device: torch.device, time_ms: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """Bytes per second each probe streams (``{"decode": .., "grouped": ..}``), timed by
    ``time_ms(fn)``; empty off CUDA or without the compiled kernels (the interpreter is no probe).
    A probe that cannot run (e.g. out of memory) warns and is left out."""
    from ..kernels import kernels_interpreted

    if torch.device(device).type != "cuda" or kernels_interpreted():
        return {}
    try:
        from ..kernels import moe_ffn
        from ..kernels.gemv import gemv_moe_ffn
    except ImportError:  # no triton
        return {}
    from .layer import graphed  # here: layer imports common, which imports this module

    rates = {}
    for name, kernel, inputs in (("decode", gemv_moe_ffn, probe_inputs), ("grouped", moe_ffn, grouped_probe_inputs)):
        try:
            args, nbytes = inputs(device)

            def calls(kernel=kernel, args=args) -> None:
                for _ in range(CALLS):
                    kernel(*args)

            rates[name] = CALLS * nbytes / (time_ms(graphed(lambda _: calls(), None)) * 1e-3)
        except (RuntimeError, ValueError) as err:  # the other streams still count
            warnings.warn(f"the {name} bandwidth probe did not run ({type(err).__name__}: {err})", stacklevel=2)
        finally:
            args = None  # free the probe's weights before the next one
    return rates
