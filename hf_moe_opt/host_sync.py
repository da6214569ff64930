"""Find host reads of tensor values on any device, CPU included.

On CUDA a host read (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean indexing) waits
for the GPU and cannot be captured in a CUDA graph; ``torch.cuda.set_sync_debug_mode`` reports it,
but only on a GPU. :func:`no_host_reads` raises on the same operations wherever the tensors live,
so a CPU test can show that a forward (a MoE layer, or a whole decode step) is capturable.

It intercepts the ATen operations whose result size or value the host must know: it cannot tell a
read of a tensor that was on the host anyway (harmless on CUDA) from a device read, so it errs on
the strict side.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Value read on the host (item/bool/int/float, equality tests) or output size known only from values.
_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
}


# A tensor made from Python data: on CUDA a copy from pageable host memory, which a capture refuses.
_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


class HostReadError(RuntimeError):
    """A tensor value was read on the host (or host data copied in) where that is not allowed."""


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _HostReadDetector(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func in _READS:
            raise HostReadError(f"host read of tensor values: aten.{func.__name__}")
        if func in _FROM_HOST:
            raise HostReadError("tensor made from Python data (torch.tensor): a host-to-device copy on CUDA")
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None and func.__name__.endswith("Tensor"):
            raise HostReadError("host read: repeat_interleave without output_size")
        if packet in (aten.index, aten.index_put, aten.index_put_) and _has_bool_index(args[1]):
            raise HostReadError(f"host read: boolean-mask indexing (aten.{func.__name__})")
        return func(*args, **kwargs)


def _refuse(name: str):
    def method(self, *args, **kwargs):
        raise HostReadError(f"host read of tensor values: Tensor.{name}()")

    return method


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Raise :class:`HostReadError` on any host read of tensor values inside the block."""
    # tolist()/numpy() read storage directly on the CPU, below the dispatcher: refuse them by name.
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    for name in saved:
        setattr(torch.Tensor, name, _refuse(name))
    try:
        with _HostReadDetector():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
