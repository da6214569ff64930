"""One lookup for the Triton kernel modules the torch-side code dispatches to on a GPU."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def compiled_kernels(name: str) -> ModuleType | None:
    """``hf_moe_opt.kernels.<name>`` when Triton compiles for a GPU here, else None (no Triton, or
    its CPU interpreter, where callers keep their torch path)."""
    try:
        from .kernels import kernels_interpreted

        module = importlib.import_module(f"{__package__}.kernels.{name}")
    except ImportError:
        return None
    return None if kernels_interpreted() else module
