"""Expert placement plans: which device holds which expert of each MoE layer, and how to judge one.

A plan maps, per layer, every expert to a list of *replicas* ``(device, share)``: the expert's
weights live on each listed device, and ``share`` of the tokens routed to the expert are computed
there. Shares of one expert sum to 1. Without replication every expert has exactly one replica with
share 1.

Quality is judged on a :class:`~hf_moe_opt.placement.trace.RoutingTrace` (ideally batches the plan
was not made from): per batch, device ``d``'s load is ``sum_e tokens[e] * share[e, d]``; the
imbalance of the batch is ``max_d load / mean_d load`` (1.0 is perfect; with expert parallelism a
layer's step takes as long as its busiest device).
"""

from __future__ import annotations

import json
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .trace import RoutingTrace

PLAN_FORMAT = "hf_moe_opt.placement_plan"
PLAN_VERSION = 1
_SHARE_TOL = 1e-6

Replica = tuple[int, float]
"""``(device, share)``: one copy of an expert and the fraction of its tokens it computes."""


def _device_index(name: str, expert: int, device: Any) -> int:
    """A replica's device as an int; a fractional or boolean value is an error, not truncated."""
    if isinstance(device, (bool, np.bool_)) or not isinstance(device, numbers.Real):
        raise ValueError(f"layer {name!r}: expert {expert} has device {device!r}, not a device index")
    try:
        return operator.index(device)
    except TypeError:
        pass
    value = float(device)
    if not value.is_integer():
        raise ValueError(f"layer {name!r}: expert {expert} has device {device!r}, not a whole device index")
    return int(value)


def _share(name: str, expert: int, share: Any) -> float:
    """A replica's share of its expert's tokens as a float (a number, not a string or a bool)."""
    if isinstance(share, (bool, np.bool_)) or not isinstance(share, numbers.Real):
        raise ValueError(f"layer {name!r}: expert {expert} has share {share!r}, not a number")
    return float(share)


def _normalise_layer(
    name: str, experts: Iterable[Iterable[Iterable[Any]]], num_devices: int
) -> tuple[tuple[Replica, ...], ...]:
    out: list[tuple[Replica, ...]] = []
    for e, replicas in enumerate(experts):
        reps = tuple((_device_index(name, e, d), _share(name, e, s)) for d, s in replicas)
        if not reps:
            raise ValueError(f"layer {name!r}: expert {e} has no replica")
        devices = [d for d, _ in reps]
        if len(set(devices)) != len(devices):
            raise ValueError(f"layer {name!r}: expert {e} lists a device twice: {devices}")
        for d, s in reps:
            if not 0 <= d < num_devices:
                raise ValueError(f"layer {name!r}: expert {e} placed on device {d}, outside [0, {num_devices})")
            if not (np.isfinite(s) and s >= 0.0):
                raise ValueError(f"layer {name!r}: expert {e} has an invalid share {s} on device {d}")
        total = sum(s for _, s in reps)
        if abs(total - 1.0) > _SHARE_TOL:
            raise ValueError(f"layer {name!r}: shares of expert {e} sum to {total}, not 1")
        out.append(reps)
    if not out:
        raise ValueError(f"layer {name!r} has no experts")
    return tuple(out)


@dataclass(frozen=True)
class PlacementPlan:
    """Per-layer expert placement over ``num_devices`` devices.

    Attributes:
        num_devices: devices the experts are spread over.
        strategy: name of the strategy that produced the plan.
        layers: layer name -> per expert, a tuple of ``(device, share)`` replicas.
        metadata: free-form JSON-serialisable facts (model name, spare slots, ...), kept as JSON
            holds them (tuples become lists, dict keys strings) so that a saved and loaded plan
            compares equal.
    """

    num_devices: int
    strategy: str
    layers: Mapping[str, Sequence[Sequence[Replica]]]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise ValueError(f"num_devices must be a positive int, got {self.num_devices!r}")
        if not isinstance(self.strategy, str):
            raise ValueError(f"strategy must be a name (str), got {self.strategy!r}")
        layers = {
            str(name): _normalise_layer(str(name), experts, self.num_devices) for name, experts in self.layers.items()
        }
        object.__setattr__(self, "layers", layers)
        try:
            # Kept as JSON holds it (tuples as lists, keys as strings): a saved and loaded plan compares equal.
            metadata = json.loads(json.dumps(dict(self.metadata)))
        except TypeError as exc:
            raise ValueError(f"plan metadata must be JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "metadata", metadata)

    # ------------------------------------------------------------------ queries
    @property
    def layer_names(self) -> list[str]:
        """Planned layers, in order."""
        return list(self.layers)

    def _layer(self, layer: str) -> tuple[tuple[Replica, ...], ...]:
        try:
            return self.layers[layer]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(f"layer {layer!r} is not in the plan; planned layers: {self.layer_names}") from None

    def num_experts(self, layer: str) -> int:
        """Experts of ``layer``."""
        return len(self._layer(layer))

    def replicas(self, layer: str, expert: int) -> list[Replica]:
        """``(device, share)`` copies of ``expert``; the first is the expert's home device."""
        experts = self._layer(layer)
        if not 0 <= expert < len(experts):
            raise IndexError(f"expert {expert} out of range for layer {layer!r} ({len(experts)} experts)")
        return list(experts[expert])

    def devices_of(self, layer: str, expert: int) -> list[int]:
        """Every device holding a copy of ``expert``."""
        return [d for d, _ in self.replicas(layer, expert)]

    def device_of(self, layer: str, expert: int) -> int:
        """The device computing most of ``expert``'s tokens (its only device without replication).

        Ties go to the replica listed first (the home device).
        """
        reps = self.replicas(layer, expert)
        best = max(range(len(reps)), key=lambda i: (reps[i][1], -i))
        return reps[best][0]

    def experts_on(self, layer: str, device: int) -> list[int]:
        """Experts with a copy on ``device``, ascending."""
        if not 0 <= device < self.num_devices:
            raise IndexError(f"device {device} out of range [0, {self.num_devices})")
        return [e for e, reps in enumerate(self._layer(layer)) if any(d == device for d, _ in reps)]

    def slots(self, layer: str) -> list[int]:
        """Expert copies held by each device for ``layer``."""
        used = [0] * self.num_devices
        for reps in self._layer(layer):
            for d, _ in reps:
                used[d] += 1
        return used

    def share_matrix(self, layer: str) -> np.ndarray:
        """``[num_experts, num_devices]`` float64 share of each expert's tokens computed on each device."""
        experts = self._layer(layer)
        mat = np.zeros((len(experts), self.num_devices), dtype=np.float64)
        for e, reps in enumerate(experts):
            for d, s in reps:
                mat[e, d] = s
        return mat

    def device_map(self, model: Any, **kwargs: Any) -> dict[str, Any]:
        """A ``from_pretrained(device_map=...)`` map: dense modules by accelerate, experts by this plan.

        See :func:`hf_moe_opt.placement.device_map_for` for the keyword arguments.
        """
        from .device_map import device_map_for

        return device_map_for(model, self, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def device_loads(self, trace: RoutingTrace, layer: str) -> np.ndarray:
        """``[num_batches, num_devices]`` tokens computed by each device in each batch of ``layer``."""
        counts = trace.counts(layer)
        shares = self.share_matrix(layer)
        if counts.shape[1] != shares.shape[0]:
            raise ValueError(f"layer {layer!r}: the trace has {counts.shape[1]} experts, the plan {shares.shape[0]}")
        return counts.astype(np.float64) @ shares

    def evaluate(self, trace: RoutingTrace, layers: Sequence[str] | None = None) -> dict[str, Any]:
        """Load imbalance of this plan on ``trace``.

        For every batch the imbalance is ``max / mean`` of the device loads (a batch with no tokens
        counts as 1.0). Returns::

            {"num_devices", "strategy",
             "layers": {name: {"avg_max_over_mean", "worst_max_over_mean", "num_batches",
                               "device_share"}},
             "overall": {"avg_max_over_mean", "worst_max_over_mean", "num_batches"}}

        where ``avg``/``worst`` are the mean/maximum over batches (overall: over every
        (layer, batch) pair) and ``device_share`` is each device's fraction of the layer's tokens.
        Every evaluated layer (default: all layers of the trace) must be in the plan.
        """
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of layer names, not the string {layers!r}")
        names = trace.layers if layers is None else list(dict.fromkeys(layers))  # each layer counted once
        if not names:
            raise ValueError(
                f"nothing to evaluate: {'the trace has no layers' if layers is None else 'layers= is empty'}"
            )
        per_layer: dict[str, dict[str, Any]] = {}
        ratios_all: list[np.ndarray] = []
        for name in names:
            self._layer(name)
            loads = self.device_loads(trace, name)
            mean = loads.mean(axis=1)
            peak = loads.max(axis=1)
            ratio = np.divide(peak, mean, out=np.ones_like(peak), where=mean > 0)
            total = loads.sum()
            share = loads.sum(axis=0) / total if total > 0 else np.full(self.num_devices, 1.0 / self.num_devices)
            per_layer[name] = {
                "avg_max_over_mean": float(ratio.mean()),
                "worst_max_over_mean": float(ratio.max()),
                "num_batches": int(ratio.shape[0]),
                "device_share": [float(x) for x in share],
            }
            ratios_all.append(ratio)
        every = np.concatenate(ratios_all)
        return {
            "num_devices": self.num_devices,
            "strategy": self.strategy,
            "layers": per_layer,
            "overall": {
                "avg_max_over_mean": float(every.mean()),
                "worst_max_over_mean": float(every.max()),
                "num_batches": int(every.shape[0]),
            },
        }

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the JSON layout)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "num_devices": self.num_devices,
            "strategy": self.strategy,
            "metadata": dict(self.metadata),
            "layers": [
                {"name": name, "experts": [[[d, s] for d, s in reps] for reps in experts]}
                for name, experts in self.layers.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlacementPlan:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"not a placement plan (a JSON {type(data).__name__}, expected an object)")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a placement plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
            raise ValueError(f"placement plan version {data.get('version')!r} is not supported (1..{PLAN_VERSION})")
        layers: dict[str, Any] = {}
        for entry in data["layers"]:
            if entry["name"] in layers:
                raise ValueError(f"layer {entry['name']!r} appears twice in the plan")
            layers[entry["name"]] = entry["experts"]
        return cls(
            num_devices=data["num_devices"],
            strategy=data["strategy"],
            layers=layers,
            metadata=data.get("metadata") or {},
        )

    def to_json(self, indent: int | None = None) -> str:
        """JSON text of the plan."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PlacementPlan:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path``; returns the path."""
        path = Path(path)
        path.write_text(self.to_json(indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        """Read a plan written by :meth:`save`.

        Raises:
            ValueError: the file is not a placement plan (or is damaged); OSError: it cannot be read.
        """
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not a placement plan written by PlacementPlan.save ({err!r})") from None
