"""Registry of expert-compute backends and the ``backend=`` option's resolution."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from .torch_backend import torch_moe_ffn

BACKENDS = ("auto", "torch", "triton")

# "auto" on CUDA runs, per call, the backend the GPU's tuned table measured faster for the expert
# shape and token count (hf_moe_opt/kernels/configs/<GPU>.json). Shapes without timings: Triton up
# to this many routed rows, torch._grouped_mm's tuned GEMMs past it.
AUTO_TRITON_MAX_ROWS = 4096


@functools.cache  # asked on every decode call (direct_ffn)
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
    """The backend for calls on ``device``: ``"torch"``, ``"triton"``, or ``"auto"`` (a per-call choice
    between the two, by measured speed; see :func:`auto_moe_ffn`)."""
    name = resolve_backend(backend, device)
    return "auto" if backend == "auto" and name == "triton" else name


def auto_moe_ffn(x, plan, w1, b1, w2, b2, activation, out_scale: float = 1.0) -> torch.Tensor:
    """``moe_ffn`` of the faster backend for this shape and token count on this GPU."""
    from ..kernels import moe_ffn, torch_faster

    faster = torch_faster(x.device, plan.num_experts, w1.shape[2], w2.shape[2], plan.top_k, plan.num_tokens)
    if faster is None:
        faster = plan.num_rows > AUTO_TRITON_MAX_ROWS
    fn = torch_moe_ffn if faster else moe_ffn
    return fn(x, plan, w1, b1, w2, b2, activation, out_scale)


def get_backend(name: str) -> Callable:
    """The ``moe_ffn`` function of a concrete backend (same signature as ``torch_moe_ffn``)."""
    if name == "torch":
        return torch_moe_ffn
    if name == "triton":
        from ..kernels import moe_ffn

        return moe_ffn
    if name == "auto":
        return auto_moe_ffn
    raise ValueError(f"unknown backend {name!r}")


def direct_ffn(name: str, num_tokens: int, max_tokens: int | None = None) -> Callable | None:
    """The plan-free decode path (:func:`hf_moe_opt.kernels.gemv.gemv_moe_ffn`) for ``num_tokens`` tokens
    on the concrete backend ``name`` ("torch", "triton" or "auto"), or None where it does not apply
    (above ``max_tokens`` tokens; default :data:`hf_moe_opt.kernels.gemv.MAX_TOKENS`).
    The caller still checks the weights and activation (:func:`hf_moe_opt.kernels.kernel_supported`)."""
    if name == "torch" or not _triton_available():
        return None
    try:
        from ..kernels import gemv
    except ImportError:
        return None
    return gemv.gemv_moe_ffn if gemv.fits(num_tokens, max_tokens) else None


def supported_direct_ffn(
    name: str, x: torch.Tensor, weights: Callable[[], tuple], activation, max_tokens: int | None = None
) -> tuple[Callable, tuple] | None:
    """:func:`direct_ffn` for the tokens ``x`` where the kernels also take these experts:
    ``(ffn, (w1, b1, w2, b2))``, or None. ``weights()`` is called only once the cheap checks passed."""
    ffn = direct_ffn(name, x.shape[0], max_tokens)
    if ffn is None:
        return None
    from ..kernels import kernel_supported

    tensors = weights()
    return (ffn, tensors) if kernel_supported(x, tensors[0], tensors[2], activation) else None
