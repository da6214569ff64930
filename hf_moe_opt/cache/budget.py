"""How many device slots each MoE layer gets: ``expert_cache=`` parsing and byte-budget allotment.

``optimize(model, expert_cache=...)`` takes

* an ``int``: experts per layer (every layer gets that many slots);
* a ``float`` in ``(0, 1]``: a fraction of each layer's experts, rounded down, at least one slot;
* a byte budget, ``"24GiB"``, ``"500MB"``, ``"1.5 TB"`` or a plain number of bytes as a string,
  shared by all layers; or
* :class:`CacheBudget`, a byte budget together with measured routing demand.

A byte budget is split by :func:`allot_slots`. Each layer first gets one slot per pinned expert
plus one; the remaining bytes go one slot at a time to the layer whose slots are smallest
relative to its *demand*, so the slot counts end up as close to proportional to the demands as
whole slots allow. Without a routing record the demand of a layer is its number of experts: every
layer keeps (nearly) the same fraction of its experts. With a record (a histogram or a trace of
per-expert token counts for each layer), the demand is the layer's *effective number of experts*,
``exp(entropy)`` of its routing distribution: a layer that spreads its tokens over many experts
gets more slots than one that keeps sending them to a few.
"""

from __future__ import annotations

import decimal
import heapq
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CacheBudget", "LayerGeometry", "allot_slots", "effective_experts", "parse_bytes", "slots_per_layer"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"24GiB"`` -> ``25769803776``. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
    (powers of 1024), case-insensitive; a bare number is bytes. A lower-case ``b`` after an upper-case
    prefix (``"3Mb"``, bits) is refused rather than read as bytes.

    Raises:
        ValueError: not a size, an unknown unit, or a size that is not positive.
    """
    m = _SIZE.match(str(text))
    unit = m.group(2) if m is not None else ""
    if len(unit) > 1 and unit.endswith("b") and unit != unit.lower():
        # "3Mb", "2Gib": written like bits (lower-case b after a capital); all lower case reads as bytes.
        raise ValueError(
            f"{text!r} reads as bits (lower-case 'b' after an upper-case prefix); write bytes as e.g. "
            f"'{m.group(1)}{unit[:-1]}B'"
        )
    if m is None or unit.lower() not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a byte size; write e.g. '24GiB', '500MB' or '1.5TB' "
            "(KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)"
        )
    # Decimal: "2.01KB" is 2010 bytes, not float rounding's 2009.
    value = decimal.Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value.is_finite() or value > 2**80:
        raise ValueError(f"{text!r} is not a usable byte size")
    if not value >= 1:
        raise ValueError(f"a byte budget must be at least one byte, got {text!r}")
    return int(value)


def _format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LayerGeometry:
    """What the allotment needs to know about one MoE layer.

    Attributes:
        name: the layer's module name.
        num_experts: experts in the layer.
        expert_bytes: bytes of one expert's weights.
        pinned: number of pinned experts (each needs its own slot).
    """

    name: str
    num_experts: int
    expert_bytes: int
    pinned: int = 0

    @property
    def min_slots(self) -> int:
        """One slot per pinned expert plus one to load the others through (if any remain)."""
        return min(self.num_experts, self.pinned + 1)


@dataclass(frozen=True)
class CacheBudget:
    """A byte budget shared by all layers, split by measured routing demand.

    Args:
        budget: bytes (int) or a size string (``"24GiB"``).
        demand: routing history per layer name: a :class:`hf_moe_opt.placement.RoutingTrace`
            (anything with ``layers()`` and ``counts(layer)``), or a mapping from layer name to a
            per-expert token histogram ``[E]``, a ``[steps, E]`` count matrix, or a
            :class:`hf_moe_opt.cache.RoutingTrace`. Layers it does not cover get the mean demand
            of those it covers.
    """

    budget: int | str
    demand: Any = field(default=None)

    @property
    def nbytes(self) -> int:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, str)):
            raise TypeError(f"CacheBudget.budget must be an int or a size string, got {self.budget!r}")
        return parse_bytes(self.budget) if isinstance(self.budget, str) else int(self.budget)


def effective_experts(histogram: Sequence[float] | np.ndarray) -> float:
    """``exp(entropy)`` of a per-expert token histogram: 1 when one expert takes every token, ``E``
    when all take the same share; 0 for an empty histogram."""
    h = np.asarray(histogram, dtype=np.float64).reshape(-1)
    total = h.sum()
    if total <= 0:
        return 0.0
    p = h[h > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def _histogram(record: Any) -> np.ndarray:
    if hasattr(record, "count_matrix"):  # hf_moe_opt.cache.RoutingTrace
        record = record.count_matrix()
    if hasattr(record, "detach"):
        record = record.detach().cpu().numpy()
    arr = np.asarray(record, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr.sum(axis=0)
    if arr.ndim != 1:
        raise ValueError(f"a routing histogram must be [E] or [steps, E], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("routing histograms hold finite token counts, got NaN or inf")
    if arr.size and arr.min() < 0:
        raise ValueError("routing histograms hold non-negative token counts")
    return arr


def layer_demand(demand: Any, layers: Sequence[LayerGeometry]) -> list[float]:
    """The demand weight of each layer (see the module docstring)."""
    if demand is None:
        return [float(g.num_experts) for g in layers]
    if hasattr(demand, "layers") and hasattr(demand, "counts"):
        # hf_moe_opt.profile's RoutingTrace has a ``layers`` property; other traces a method.
        names = demand.layers() if callable(demand.layers) else demand.layers
        records = {name: demand.counts(name) for name in names}
    elif isinstance(demand, Mapping):
        records = dict(demand)
    else:
        raise TypeError(
            "demand must be a routing trace (layers()/counts()) or a mapping {layer name: histogram}, "
            f"got {type(demand).__name__}"
        )
    names = {g.name for g in layers}
    unknown = sorted(set(records) - names)
    if unknown:
        raise ValueError(
            f"routing demand names layers the model lacks: {unknown[:5]}; its MoE layers: {sorted(names)[:5]}..."
        )
    weights: dict[str, float] = {}
    for g in layers:
        if g.name in records:
            hist = _histogram(records[g.name])
            if hist.size != g.num_experts:
                raise ValueError(f"routing demand for {g.name} has {hist.size} experts, the layer {g.num_experts}")
            weights[g.name] = max(effective_experts(hist), 1.0)
    if not weights:
        return [float(g.num_experts) for g in layers]
    mean = sum(weights.values()) / len(weights)
    return [weights.get(g.name, mean) for g in layers]


def allot_slots(budget_bytes: int, layers: Sequence[LayerGeometry], demand: Any = None) -> list[int]:
    """Split ``budget_bytes`` into whole slots per layer, in proportion to demand.

    Raises:
        ValueError: the budget is below the minimum (one slot per layer plus pinned experts) or
            larger than all the layers' experts (then nothing needs caching: use no cache).
    """
    total = sum(g.num_experts * g.expert_bytes for g in layers)
    minimum = sum(g.min_slots * g.expert_bytes for g in layers)
    if budget_bytes > total:
        raise ValueError(
            f"the expert cache budget {_format_bytes(budget_bytes)} is larger than all experts of the model "
            f"({_format_bytes(total)}): every expert fits on the device, so use no cache (expert_cache=None)"
        )
    if budget_bytes < minimum:
        raise ValueError(
            f"the expert cache budget {_format_bytes(budget_bytes)} is below one expert per layer "
            f"(plus pinned experts): it needs at least {_format_bytes(minimum)} for {len(layers)} MoE layers"
        )
    weights = layer_demand(demand, layers)
    slots = [g.min_slots for g in layers]
    left = budget_bytes - minimum
    # Fill the layer whose slots are smallest relative to its demand; ties go to the earlier layer.
    heap = [
        ((slots[i] + 1) / w, i)
        for i, (g, w) in enumerate(zip(layers, weights, strict=True))
        if slots[i] < g.num_experts
    ]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        g = layers[i]
        if g.expert_bytes > left:
            continue  # this layer's experts no longer fit; smaller ones may
        slots[i] += 1
        left -= g.expert_bytes
        if slots[i] < g.num_experts:
            heapq.heappush(heap, ((slots[i] + 1) / weights[i], i))
    return slots


def slots_per_layer(spec: Any, layers: Sequence[LayerGeometry]) -> list[int]:
    """Slots of every layer for an ``expert_cache=`` value (int, float, size string or :class:`CacheBudget`).

    Raises:
        TypeError: an unsupported type.
        ValueError: a value out of range (see the module docstring).
    """
    if isinstance(spec, bool):
        raise TypeError("expert_cache must be an int, a float, a byte size string or a CacheBudget, not a bool")
    if isinstance(spec, numbers.Integral):  # numpy and torch integers too
        spec = int(spec)
        largest = max(g.num_experts for g in layers)
        if spec < 1:
            raise ValueError(f"expert_cache={spec}: keep at least one expert per layer on the device")
        too_small = [g for g in layers if spec < g.min_slots]
        if too_small:
            g = too_small[0]
            raise ValueError(
                f"expert_cache={spec} leaves no free slot next to the {g.pinned} pinned experts of {g.name}: "
                f"it needs at least {g.min_slots} slots there"
            )
        if spec > largest:
            raise ValueError(
                f"expert_cache={spec} experts per layer is more than the layers have ({largest}): every expert "
                "fits, so use no cache (expert_cache=None)"
            )
        return [min(spec, g.num_experts) for g in layers]
    if isinstance(spec, numbers.Real):  # numpy floats too
        spec = float(spec)
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"expert_cache={spec}: a fraction of each layer's experts must lie in (0, 1]")
        slots = [int(spec * g.num_experts + 1e-9) for g in layers]
        raised = [(g, s) for g, s in zip(layers, slots, strict=True) if g.pinned and s < g.min_slots]
        if raised:
            g, s = raised[0]
            warnings.warn(
                f"expert_cache={spec} gives {g.name} {s} slots, fewer than its {g.pinned} pinned experts and one "
                f"free slot: it gets {g.min_slots}"
                + (" (all its experts: nothing is cached there)" if g.min_slots == g.num_experts else ""),
                UserWarning,
                stacklevel=4,
            )
        return [max(g.min_slots, s) for g, s in zip(layers, slots, strict=True)]
    if isinstance(spec, str):
        return allot_slots(parse_bytes(spec), layers)
    if isinstance(spec, CacheBudget):
        return allot_slots(spec.nbytes, layers, spec.demand)
    raise TypeError(
        f"expert_cache must be an int (experts per layer), a float in (0, 1] (fraction), a byte size string "
        f"like '24GiB' or a CacheBudget, got {type(spec).__name__}"
    )
