"""Registry of expert-compute backends and the ``backend=`` option's resolution."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from .torch_backend import torch_moe_ffn

BACKENDS = ("auto", "torch", "triton")

# "auto" on CUDA: the Triton kernels win while launches and weight reads dominate; past this many
# routed rows torch._grouped_mm's tuned GEMMs win (benchmarks/results/layer_h200.json, H200, bf16).
AUTO_TRITON_MAX_ROWS = 4096


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends that can run on this installation (device permitting)."""
    names = ["torch"]
    if _triton_available():
        try:
            from ..kernels import moe_ffn  # noqa: F401
        except ImportError:
            return names
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn the user's ``backend`` option into a concrete backend for ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in available_backends():
            return "triton"
        return "torch"
    if backend == "triton":
        if "triton" not in available_backends():
            raise ValueError("backend='triton' needs the triton package (pip install 'hf_moe_opt[triton]')")
        if device.type != "cuda":
            import os

            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    f"backend='triton' runs on CUDA devices (the experts are on {device}); "
                    "use backend='torch' or set TRITON_INTERPRET=1 for a slow correctness run"
                )
    return backend


def choose_backend(backend: str, device: torch.device, rows: int) -> str:
    """The concrete backend for one call: ``backend`` resolved for ``device`` and ``rows`` routed rows."""
    name = resolve_backend(backend, device)
    if backend == "auto" and name == "triton" and rows > AUTO_TRITON_MAX_ROWS:
        return "torch"
    return name


def get_backend(name: str) -> Callable:
    """The ``moe_ffn`` function of a concrete backend (same signature as ``torch_moe_ffn``)."""
    if name == "torch":
        return torch_moe_ffn
    if name == "triton":
        from ..kernels import moe_ffn

        return moe_ffn
    raise ValueError(f"unknown backend {name!r}")
