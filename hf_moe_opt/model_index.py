"""A model's modules and parameters, walked once and kept until some module's structure changes.

A graphed ``generate`` call checks, before it replays anything, that the weights are where the
graphs captured them and which layers may run inside a graph. Walking a large model for that
(switch-base-128: about 8,000 modules and 3,300 parameters) takes tens of milliseconds of Python per
call, as much as the replayed decode steps of a short generation. :class:`ModelIndex` walks once and
walks again only after a module or parameter was registered or replaced anywhere in the process
(PyTorch's global registration hooks count those), so a call costs one pass over a list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

_version = 0
_hooks: list[Any] = []


def _bump(*_: Any) -> None:
    global _version
    _version += 1  # returns None: the hook never changes what is registered


def structure_version() -> int:
    """A number that changes whenever any module, parameter or buffer is registered or assigned in this
    process (``setattr`` on a module, ``add_module``, ``register_parameter``, ...). Counting starts at
    the first call."""
    if not _hooks:
        _hooks.extend(
            register(_bump)
            for register in (
                register_module_module_registration_hook,
                register_module_parameter_registration_hook,
                register_module_buffer_registration_hook,
            )
        )
    return _version


class ModelIndex:
    """``model``'s parameters and the modules that ``select`` keeps, as lists, re-walked only when
    :func:`structure_version` has changed since the last walk.

    Not seen: ``del module.child`` and direct edits of ``module._modules`` (neither runs PyTorch's
    registration hooks), and ``param.data = ...`` (compare :meth:`weights_key` for that).
    """

    def __init__(self, model: nn.Module, select: Callable[[str, nn.Module], bool]):
        self.model = model
        self._select = select
        self._version: int | None = None
        self._params: list[nn.Parameter] = []
        self._buffers: list = []
        self._modules: list[tuple[str, nn.Module]] = []

    def _fresh(self) -> None:
        version = structure_version()
        if version != self._version:
            self._params = list(self.model.parameters())
            self._buffers = list(self.model.buffers())
            self._modules = [(n, m) for n, m in self.model.named_modules() if self._select(n, m)]
            self._version = structure_version()  # the walk itself registers nothing, but be exact

    def modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module ``select`` keeps, in ``named_modules`` order."""
        self._fresh()
        return self._modules

    def weights_key(self) -> tuple[int, ...]:
        """Where every parameter's and buffer's data lives now: changes when the model is moved, cast or
        given new weights (``param.data = ...`` included), or a buffer is replaced (NLLB-MoE regrows its
        position tables for a longer sequence)."""
        self._fresh()
        return tuple(p.data_ptr() for p in self._params) + tuple(b.data_ptr() for b in self._buffers)
