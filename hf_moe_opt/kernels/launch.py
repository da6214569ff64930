"""Kernel launches that skip Triton's per-call argument binding once a kernel is compiled.

``kernel[grid](*args, **meta)`` binds and specialises every argument in Python on each call, then
looks the compiled kernel up; on a GPU host that is tens of microseconds per launch. A one-token
decode step of an eager or expert-cached model launches four of our kernels per MoE layer and
little else, so this binding is a large part of its time. :func:`launch` keys the compiled kernel by
everything Triton specialises on -- each tensor's dtype and 16-byte alignment; each integer's type
range, divisibility by 16 and equality to 1; which arguments are floats, bools or None; the
constexpr values and launch options; the device -- and calls the compiled kernel directly when that
key was seen before. The first call with a new key goes through Triton as usual (compiling the
kernel or finding it in Triton's own cache), so the key is at least as fine as Triton's own and the
kernel that runs is the one Triton would pick.

Off (every call through Triton) with ``HF_MOE_OPT_FAST_LAUNCH=0``, in Triton's interpreter, on a
CPU, while Triton's launch hooks are set (profilers read them), and for argument kinds it does not
know (tensor descriptors, tuples): those calls always take Triton's path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from triton import knobs as _knobs
except ImportError:
    _knobs = None

ENV_VAR = "HF_MOE_OPT_FAST_LAUNCH"

_INT32_MIN, _INT32_END = -(2**31), 2**31
_INT64_MIN, _INT64_END = -(2**63), 2**63
_TENSOR = torch.Tensor
_PLAIN = (float, bool, type(None))
# id(kernel) -> (kernel, {key: (compiled kernel, names of the parameters passed by keyword, in order)}).
_COMPILED: dict[int, tuple[Any, dict[tuple, tuple[Any, list[str]]]]] = {}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grid sizes: ``triton.cdiv`` without its host-side call cost (Triton 3.6
    makes it a constexpr function, a few microseconds per call on the launch path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 at least ``n`` (0 for 0), as ``triton.next_power_of_2``, cheaper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def enabled() -> bool:
    """Whether :func:`launch` may bypass Triton's binding (``HF_MOE_OPT_FAST_LAUNCH`` not ``0``)."""
    return os.environ.get(ENV_VAR, "1") != "0"


def _hooks_set() -> bool:
    """Whether a launch hook is installed (a profiler): those launches go through Triton."""
    if _knobs is None:  # a Triton without knobs: let it launch (and honour whatever it has)
        return True
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        # Newer Triton keeps an always-present chain of hooks; older ones a callable or None.
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def arg_key(args: tuple) -> tuple | None:
    """What Triton specialises on in runtime arguments ``args``; None for kinds not handled here.

    Tensors: dtype and whether the data pointer is 16-byte aligned. Integers: 1 (a constant to
    Triton), else the type range (i32 / i64 / u64) and divisibility by 16. Floats, bools and None
    by kind only (Triton does not specialise on their values; None is a constant). Flat: a tensor
    adds its dtype and alignment, anything else one entry, so the key reads back unambiguously.
    """
    key = []
    push = key.append
    for a in args:
        kind = a.__class__
        if kind is _TENSOR:
            push(a.dtype)
            push(a.data_ptr() & 15 == 0)
        elif kind is int:
            if a == 1:
                push(1)
            else:
                rank = 0 if _INT32_MIN <= a < _INT32_END else 2 if _INT64_MIN <= a < _INT64_END else 4
                push(2 + rank + (a & 15 == 0))
        elif kind in _PLAIN:
            push(kind)
        elif isinstance(a, _TENSOR):  # subclasses (parameters)
            push(a.dtype)
            push(a.data_ptr() & 15 == 0)
        else:
            return None
    return tuple(key)


def launch(kernel, grid, /, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``, through the compiled kernel when this specialisation ran before.

    ``args``: the runtime (not constexpr) arguments, positionally, in the kernel's parameter order;
    ``meta``: every later parameter by name (constexprs) and launch options (``num_warps``,
    ``launch_pdl``, ...). Calls that do not fit that shape (or a callable grid) always go through Triton.
    """
    entry = _COMPILED.get(id(kernel))
    if entry is not None and grid.__class__ is tuple and enabled() and not _hooks_set():
        key = _key(args, meta)
        hit = entry[1].get(key) if key is not None else None
        if hit is not None:
            compiled, names = hit
            size = len(grid)
            compiled.run(
                grid[0],
                grid[1] if size > 1 else 1,
                grid[2] if size > 2 else 1,
                torch._C._cuda_getCurrentRawStream(key[0]),
                compiled.function,
                compiled.packed_metadata,
                None,  # launch metadata and hooks: only read by hooks, and none is set
                None,
                None,
                *args,
                *[meta[n] for n in names],
            )
            return
    compiled = kernel[grid](*args, **meta)
    if grid.__class__ is not tuple or not _direct_callable(compiled) or not enabled():
        return  # the interpreter returns no compiled kernel
    names = _keyword_params(kernel, len(args), meta)
    key = _key(args, meta) if names is not None else None
    if key is not None:
        _COMPILED.setdefault(id(kernel), (kernel, {}))[1][key] = (compiled, names)


def _key(args: tuple, meta: dict[str, Any]) -> tuple | None:
    key = arg_key(args)
    if key is None:
        return None
    full = (torch._C._cuda_getDevice(), key, tuple(meta.items()))
    try:
        hash(full)
    except TypeError:  # an unhashable meta value
        return None
    return full


def _direct_callable(compiled) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))


def _keyword_params(kernel, num_positional: int, meta: dict[str, Any]) -> list[str] | None:
    """The kernel's parameters after the positional ones, in order, if the positional ones are all
    runtime parameters, the rest all constexprs and ``meta`` names each of them; else None (no
    direct path)."""
    params = getattr(kernel, "params", None)
    names = getattr(kernel, "arg_names", None)
    if params is None or names is None or len(params) < num_positional:
        return None
    if any(getattr(p, "is_constexpr", True) for p in params[:num_positional]):
        return None  # a constexpr passed positionally would be keyed by kind, not value
    if not all(getattr(p, "is_constexpr", False) for p in params[num_positional:]):
        return None  # a runtime argument by keyword (a tensor) would key by identity: keys without end
    rest = list(names[num_positional:])
    return rest if all(n in meta for n in rest) else None


def compiled_count(kernel) -> int:
    """How many specialisations of ``kernel`` the direct path knows (tests, diagnostics)."""
    entry = _COMPILED.get(id(kernel))
    return len(entry[1]) if entry is not None else 0


def clear() -> None:
    """Forget every compiled kernel this module keeps (tests; Triton's own caches stay)."""
    _COMPILED.clear()
