"""Programmatic dependent launch (Hopper and newer): a kernel launches while its predecessor drains.

A decode step runs a handful of small kernels back to back; between two of them the GPU idles for
the launch of the second (about a microsecond each, even replayed from a CUDA graph). Launched with
PDL, the next kernel's programs are scheduled as the previous kernel's programs exit and wait in
``griddepcontrol.wait`` until its memory is visible. Every kernel of ours that takes PDL calls
:func:`wait_for_producer` before it touches global memory, so it is safe after any kernel, ours or
not, and the order of effects is the stream order.

``HF_MOE_OPT_PDL=0`` turns it off (profiling, comparisons). Off on GPUs before compute capability 9,
in Triton's interpreter, and with Triton versions that lack it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV_VAR = "HF_MOE_OPT_PDL"


@triton.jit
def wait_for_producer(USE_PDL: tl.constexpr):
    """Block until the previous kernel of the stream has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait")


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL."""
    if device.type != "cuda" or os.environ.get(ENV_VAR, "1") == "0" or not _triton_has_pdl():
        return False
    from .moe_ffn import kernels_interpreted

    if kernels_interpreted():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the ``USE_PDL`` constexpr and, when on, ``launch_pdl``."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
