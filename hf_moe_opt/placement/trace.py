"""Routing history: how many tokens each expert of each MoE layer received, batch by batch.

A :class:`RoutingTrace` is the input of the placement planner (load balancing, Sec. 6 of Huang et
al., "Toward Efficient Inference for Mixture of Experts"). Per MoE layer it keeps

* a ``[num_batches, num_experts]`` int64 matrix: row ``b`` holds the tokens routed to each expert in
  batch ``b`` (a token routed to ``k`` experts counts once for each of them);
* optionally a ``[num_experts, num_experts]`` int64 co-activation matrix summed over the batches that
  supplied one: entry ``(i, j)`` counts tokens whose top-k set holds both ``i`` and ``j``; the
  diagonal ``(i, i)`` counts the tokens routed to ``i``.

Traces are stored as JSON (readable, diff-able) or NPZ (compact); both are plain data and are read
back without pickle.
"""

from __future__ import annotations

import json
import math
import numbers
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMAT = "hf_moe_opt.routing_trace"
TRACE_VERSION = 1

_RESERVED_METADATA = ("model_name", "num_experts", "top_k")


def _to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a numpy array; torch tensors are detached and moved to the host."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _as_count_array(array: Any, what: str, ndim: int) -> np.ndarray:
    """Validate a non-negative integer-valued array of rank ``ndim`` and return it as int64."""
    arr = _to_numpy(array)
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold whole token counts, got non-integer values")
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int64)
    else:
        raise ValueError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} must be non-negative, got a minimum of {int(arr.min())}")
    return arr


def routing_statistics(expert_index: Any, num_experts: int, keep: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert token counts and the co-activation matrix of one batch of router choices.

    Args:
        expert_index: ``[tokens, top_k]`` integer expert choices (numpy or torch).
        num_experts: ``E``.
        keep: optional ``[tokens, top_k]`` bool mask; False marks an assignment the router dropped
            (capacity, padding), which is then counted nowhere.

    Returns:
        ``(counts, coactivation)``: ``[E]`` and ``[E, E]`` int64 arrays.
    """
    idx = _to_numpy(expert_index)
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2:
        raise ValueError(f"expert_index must be [tokens, top_k], got shape {tuple(idx.shape)}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"expert_index must be an integer array, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
        raise ValueError(f"expert_index values must lie in [0, {num_experts}), got [{idx.min()}, {idx.max()}]")
    if keep is None:
        mask = np.ones(idx.shape, dtype=bool)
    else:
        mask = _to_numpy(keep).astype(bool)
        if mask.shape != idx.shape:
            raise ValueError(f"keep {tuple(mask.shape)} must match expert_index {tuple(idx.shape)}")
    # Membership matrix of each token's (kept) experts; repeated choices of one expert count once.
    member = np.zeros((idx.shape[0], num_experts), dtype=bool)
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    member[rows[mask], idx[mask]] = True
    counts = member.sum(axis=0, dtype=np.int64)
    m = member.astype(np.float64)
    coactivation = np.rint(m.T @ m).astype(np.int64)
    return counts, coactivation


class RoutingTrace:
    """Per-layer routing history, recorded batch by batch.

    Args:
        metadata: free-form JSON-serialisable facts about the run (dataset, batch size, ...), kept
            as JSON holds them (tuples become lists, dict keys strings) so that a saved and loaded
            trace compares equal.
        model_name: name or path of the model that was traced.
        num_experts: experts per MoE layer; when omitted, taken from the first batch added.
        top_k: experts per token.

    ``model_name``, ``num_experts`` and ``top_k`` are kept in :attr:`metadata` under those keys.
    """

    def __init__(
        self,
        metadata: Mapping[str, Any] | None = None,
        *,
        model_name: str | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
    ) -> None:
        meta: dict[str, Any] = dict(metadata or {})
        for key, value in (("model_name", model_name), ("num_experts", num_experts), ("top_k", top_k)):
            if value is not None:
                meta[key] = value
        for key in ("num_experts", "top_k"):
            value = meta.get(key)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                meta[key] = value = int(value)  # numpy and torch integers too (JSON holds plain ints)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        try:
            # Kept as JSON holds it (tuples as lists, keys as strings): a saved and loaded trace compares equal.
            meta = json.loads(json.dumps(meta))
        except TypeError as exc:
            raise ValueError(f"metadata must be JSON-serialisable (plain str/int/float/list/dict): {exc}") from exc
        self.metadata: dict[str, Any] = meta
        self._rows: dict[str, list[np.ndarray]] = {}
        self._stacked: dict[str, np.ndarray] = {}
        self._coact: dict[str, np.ndarray] = {}
        self._coact_batches: dict[str, int] = {}

    # ------------------------------------------------------------------ metadata
    @property
    def model_name(self) -> str | None:
        """Name of the traced model, if recorded."""
        return self.metadata.get("model_name")

    @property
    def num_experts(self) -> int | None:
        """Experts per MoE layer (None until known)."""
        return self.metadata.get("num_experts")

    @property
    def top_k(self) -> int | None:
        """Experts per token, if recorded."""
        return self.metadata.get("top_k")

    # ------------------------------------------------------------------ recording
    def add_batch(self, layer_name: str, expert_counts: Any, coactivation: Any | None = None) -> None:
        """Append one batch of one layer.

        Args:
            layer_name: module name of the MoE block, e.g. ``"encoder.block.1.layer.1.mlp"``.
            expert_counts: ``[num_experts]`` tokens routed to each expert (numpy or torch, integer).
            coactivation: optional ``[num_experts, num_experts]`` co-activation counts of this batch;
                added to the layer's running total.
        """
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name must be a non-empty str, got {layer_name!r}")
        counts = _as_count_array(expert_counts, "expert_counts", 1)
        num_experts = self.num_experts
        if num_experts is None:
            if counts.shape[0] < 1:
                raise ValueError("expert_counts must hold at least one expert")
            self.metadata["num_experts"] = num_experts = int(counts.shape[0])
        if counts.shape[0] != num_experts:
            raise ValueError(
                f"layer {layer_name!r}: expert_counts has {counts.shape[0]} entries, the trace has "
                f"{num_experts} experts per layer"
            )
        if coactivation is not None:
            co = _as_count_array(coactivation, "coactivation", 2)
            if co.shape != (num_experts, num_experts):
                raise ValueError(
                    f"layer {layer_name!r}: coactivation must be [{num_experts}, {num_experts}], got {tuple(co.shape)}"
                )
            if layer_name in self._coact:
                self._coact[layer_name] = self._coact[layer_name] + co
            else:
                self._coact[layer_name] = co.copy()
            self._coact_batches[layer_name] = self._coact_batches.get(layer_name, 0) + 1
        self._rows.setdefault(layer_name, []).append(counts)
        self._stacked.pop(layer_name, None)

    def add_routing(self, layer_name: str, expert_index: Any, keep: Any | None = None) -> None:
        """Append one batch from raw router choices ``[tokens, top_k]`` (counts and co-activation).

        ``num_experts`` must already be known (constructor or an earlier batch).
        """
        if self.num_experts is None:
            raise ValueError("add_routing needs num_experts: pass it to RoutingTrace(...) first")
        counts, co = routing_statistics(expert_index, self.num_experts, keep)
        self.add_batch(layer_name, counts, co)

    # ------------------------------------------------------------------ access
    @property
    def layers(self) -> list[str]:
        """Layer names in the order they were first recorded."""
        return list(self._rows)

    def _check_layer(self, layer: str) -> None:
        if layer not in self._rows:
            raise KeyError(f"layer {layer!r} is not in the trace; known layers: {self.layers}")

    def counts(self, layer: str) -> np.ndarray:
        """``[num_batches, num_experts]`` int64 tokens per expert per batch (a read-only view)."""
        self._check_layer(layer)
        stacked = self._stacked.get(layer)
        if stacked is None:
            stacked = np.stack(self._rows[layer]).astype(np.int64)
            stacked.setflags(write=False)
            self._stacked[layer] = stacked
        return stacked

    def coactivation(self, layer: str) -> np.ndarray | None:
        """Summed ``[num_experts, num_experts]`` co-activation counts, or None if never recorded."""
        self._check_layer(layer)
        co = self._coact.get(layer)
        return None if co is None else co.copy()

    def coactivation_batches(self, layer: str) -> int:
        """How many of the layer's batches contributed to :meth:`coactivation`."""
        self._check_layer(layer)
        return self._coact_batches.get(layer, 0)

    def num_batches(self, layer: str | None = None) -> int:
        """Batches recorded for ``layer``; without a layer, the common count (error if they differ)."""
        if layer is not None:
            self._check_layer(layer)
            return len(self._rows[layer])
        sizes = {len(rows) for rows in self._rows.values()}
        if not sizes:
            return 0
        if len(sizes) > 1:
            raise ValueError(f"layers hold different numbers of batches: {sorted(sizes)}; pass a layer")
        return sizes.pop()

    def mean_load(self, layer: str) -> np.ndarray:
        """``[num_experts]`` float64 mean tokens per batch of each expert."""
        return self.counts(layer).mean(axis=0)

    # ------------------------------------------------------------------ transforms
    def select_batches(self, batches: Sequence[int] | np.ndarray) -> RoutingTrace:
        """A new trace with only the given batch indices of every layer (co-activation not carried).

        Co-activation is a sum over batches and cannot be divided among them, so the result holds
        none. Indices may repeat; they must be integers in ``[0, num_batches)`` (a boolean mask is
        refused rather than read as the indices 0 and 1).
        """
        index = np.asarray(batches)
        if index.ndim != 1 or index.size == 0:
            raise ValueError(f"batches must be a non-empty 1-D sequence of batch indices, got shape {index.shape}")
        if index.dtype == np.bool_ or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"batches must be integer batch indices (not a {index.dtype} mask or values)")
        index = index.astype(np.int64)
        out = RoutingTrace(self.metadata)
        for layer in self.layers:
            counts = self.counts(layer)
            if index.min() < 0 or index.max() >= counts.shape[0]:
                raise ValueError(
                    f"batch indices must lie in [0, {counts.shape[0]}) for layer {layer!r}, "
                    f"got {index.min()}..{index.max()}"
                )
            for row in counts[index]:
                out.add_batch(layer, row)
        return out

    def split(self, fraction: float = 0.5) -> tuple[RoutingTrace, RoutingTrace]:
        """Split every layer by batch into ``(fit, held_out)``.

        The first ``floor(fraction * num_batches)`` batches form the fit part (the history a plan is
        made from), the rest the held-out part (the future it is judged on). Both must be non-empty.
        Co-activation sums cannot be attributed to batches, so neither part carries them.
        """
        if not (isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0.0 < fraction < 1.0):
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction!r}")
        if not self._rows:
            raise ValueError("cannot split an empty trace")
        fit = RoutingTrace(self.metadata)
        held = RoutingTrace(self.metadata)
        for layer in self.layers:
            counts = self.counts(layer)
            n = counts.shape[0]
            cut = int(math.floor(fraction * n))
            if cut < 1 or cut >= n:
                raise ValueError(
                    f"layer {layer!r} has {n} batches; fraction {fraction} leaves one part empty "
                    "(record more batches or change the fraction)"
                )
            for row in counts[:cut]:
                fit.add_batch(layer, row)
            for row in counts[cut:]:
                held.add_batch(layer, row)
        return fit, held

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        if self.metadata != other.metadata or self.layers != other.layers:
            return False
        for layer in self.layers:
            if not np.array_equal(self.counts(layer), other.counts(layer)):
                return False
            a, b = self._coact.get(layer), other._coact.get(layer)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return False
            if self.coactivation_batches(layer) != other.coactivation_batches(layer):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sizes = {layer: len(rows) for layer, rows in self._rows.items()}
        return f"RoutingTrace(model_name={self.model_name!r}, num_experts={self.num_experts}, layers={sizes})"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the JSON layout)."""
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "metadata": self.metadata,
            "layers": [
                {
                    "name": layer,
                    "counts": self.counts(layer).tolist(),
                    "coactivation": None if layer not in self._coact else self._coact[layer].tolist(),
                    "coactivation_batches": self._coact_batches.get(layer, 0),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingTrace:
        """Inverse of :meth:`to_dict`."""
        _check_header(data)
        trace = cls(data.get("metadata") or {})
        for entry in data["layers"]:
            name = entry["name"]
            if name in trace.layers:
                raise ValueError(f"layer {name!r} appears twice in the trace")
            rows = _stored_counts(entry["counts"], name)
            trace._load_layer(name, rows, entry.get("coactivation"), _stored_batches(entry, name))
        return trace

    def _load_layer(self, name: str, counts: np.ndarray, coactivation: Any | None, coact_batches: int) -> None:
        if counts.shape[0] < 1:
            raise ValueError(f"layer {name!r} holds no batches")
        for row in counts:
            self.add_batch(name, row)
        if coact_batches > counts.shape[0]:
            raise ValueError(
                f"layer {name!r}: coactivation_batches {coact_batches} exceeds its {counts.shape[0]} batches"
            )
        if coactivation is not None:
            co = _as_count_array(np.asarray(coactivation), "coactivation", 2)
            if co.shape != (self.num_experts, self.num_experts):
                raise ValueError(f"layer {name!r}: stored coactivation has shape {tuple(co.shape)}")
            self._coact[name] = co
            self._coact_batches[name] = coact_batches

    def save(self, path: str | Path) -> Path:
        """Write the trace; ``.json`` or ``.npz`` chosen by the file suffix. Returns the path."""
        path = Path(path)
        kind = _format_of(path)
        if kind == "json":
            path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
            return path
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "metadata": self.metadata,
            "layers": [
                {"name": layer, "coactivation_batches": self._coact_batches.get(layer, 0)} for layer in self.layers
            ],
        }
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header))}
        for i, layer in enumerate(self.layers):
            arrays[f"counts_{i}"] = np.ascontiguousarray(self.counts(layer))
            if layer in self._coact:
                arrays[f"coactivation_{i}"] = self._coact[layer]
        with path.open("wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by :meth:`save` (format chosen by suffix; never unpickles).

        Raises:
            ValueError: the file is not a routing trace (or is damaged); OSError: it cannot be read.
        """
        path = Path(path)
        try:
            return cls._load(path)
        except (
            KeyError,
            TypeError,
            AttributeError,
            json.JSONDecodeError,
            UnicodeDecodeError,
            zipfile.BadZipFile,
        ) as err:
            raise ValueError(f"{str(path)!r} is not a routing trace written by RoutingTrace.save ({err!r})") from None
        except ValueError as err:
            if "pickle" in str(err):  # numpy's advice to unpickle a foreign file: not ours to follow
                raise ValueError(f"{str(path)!r} is not a routing trace written by RoutingTrace.save") from None
            raise

    @classmethod
    def _load(cls, path: Path) -> RoutingTrace:
        if _format_of(path) == "json":
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            _check_header(header)
            trace = cls(header.get("metadata") or {})
            for i, entry in enumerate(header["layers"]):
                co_key = f"coactivation_{i}"
                co = npz[co_key] if co_key in npz.files else None
                name = entry["name"]
                trace._load_layer(name, _stored_counts(npz[f"counts_{i}"], name), co, _stored_batches(entry, name))
        return trace


def _stored_counts(data: Any, name: str) -> np.ndarray:
    """A stored ``[num_batches, num_experts]`` count table, checked as :meth:`RoutingTrace.add_batch`
    checks counts (no fractions truncated, no booleans read as counts)."""
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        raise ValueError(f"layer {name!r}: counts must be whole token counts, got booleans")
    if arr.ndim != 2:
        raise ValueError(f"layer {name!r}: counts must be a [num_batches, num_experts] table")
    return _as_count_array(arr, f"layer {name!r}: counts", 2)


def _stored_batches(entry: Mapping[str, Any], name: str) -> int:
    """A stored layer's ``coactivation_batches``: a whole number >= 0."""
    value = entry.get("coactivation_batches", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"layer {name!r}: coactivation_batches must be a whole number >= 0, got {value!r}")
    return value


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".npz":
        return "npz"
    raise ValueError(f"unknown trace file type {path.suffix!r} for {str(path)!r}: use .json or .npz")


def _check_header(data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"not a routing trace (a JSON {type(data).__name__}, expected an object)")
    if data.get("format") != TRACE_FORMAT:
        raise ValueError(f"not a routing trace (format {data.get('format')!r}, expected {TRACE_FORMAT!r})")
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= TRACE_VERSION:
        raise ValueError(f"routing trace version {data.get('version')!r} is not supported (1..{TRACE_VERSION})")


def synthetic_zipf_trace(
    num_layers: int = 2,
    num_experts: int = 128,
    num_batches: int = 32,
    tokens_per_batch: int = 4096,
    top_k: int = 2,
    alpha: float = 1.0,
    seed: int = 0,
    drift: float = 0.2,
    group_size: int = 8,
    topic_boost: float = 2.0,
    layer_names: Iterable[str] | None = None,
) -> RoutingTrace:
    """A skewed routing trace with batch-to-batch variation and correlated experts.

    Per layer, expert popularity follows a Zipf law (``p_j ∝ rank_j^-alpha``) over a random
    permutation of the experts, so the hot experts sit at arbitrary indices. Experts are split into
    random groups of ``group_size``; in every batch each group's popularity is multiplied by
    ``exp(drift * z)`` with ``z ~ N(0, 1)`` drawn per (batch, group), so experts of one group rise and
    fall together (correlated per-batch loads). Each token picks a group (by the batch's group
    popularity) and its top-k experts are drawn without replacement with that group's experts
    favoured by ``exp(topic_boost)``, so experts of one group are also co-activated more often.
    Counts and co-activation are recorded for every batch.

    Args:
        num_layers: MoE layers; named ``layers.{i}.mlp`` unless ``layer_names`` is given.
        num_experts: experts per layer.
        num_batches: batches per layer.
        tokens_per_batch: tokens per batch (each routed to ``top_k`` distinct experts).
        top_k: experts per token (``<= num_experts``).
        alpha: Zipf exponent (0 gives uniform popularity).
        seed: random seed (the trace is a deterministic function of the arguments).
        drift: standard deviation of the per-batch log-multiplier shared by a group.
        group_size: experts per correlated group.
        topic_boost: log-odds boost of a token's own group.
        layer_names: optional names, one per layer.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("num_experts", num_experts),
        ("num_batches", num_batches),
        ("tokens_per_batch", tokens_per_batch),
        ("top_k", top_k),
        ("group_size", group_size),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_experts ({num_experts})")
    for name, value in (("alpha", alpha), ("drift", drift), ("topic_boost", topic_boost)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if alpha < 0 or drift < 0:
        raise ValueError(f"alpha and drift must be non-negative, got alpha={alpha}, drift={drift}")
    # Plain Python numbers from here (numpy ones are accepted; the metadata is JSON).
    num_layers, num_experts, num_batches = int(num_layers), int(num_experts), int(num_batches)
    tokens_per_batch, top_k, group_size = int(tokens_per_batch), int(top_k), int(group_size)
    alpha, drift, topic_boost = float(alpha), float(drift), float(topic_boost)
    if isinstance(layer_names, str):
        raise TypeError(f"layer_names must be a list of names, not the string {layer_names!r}")
    names = [f"layers.{i}.mlp" for i in range(num_layers)] if layer_names is None else list(layer_names)
    if len(names) != num_layers:
        raise ValueError(f"layer_names has {len(names)} names for {num_layers} layers")
    if len(set(names)) != len(names):
        raise ValueError(f"layer_names repeats a name: {names}")

    rng = np.random.default_rng(seed)
    trace = RoutingTrace(
        {
            "source": "synthetic_zipf_trace",
            "alpha": alpha,
            "drift": drift,
            "seed": seed,
            "tokens_per_batch": tokens_per_batch,
        },
        model_name="synthetic-zipf",
        num_experts=num_experts,
        top_k=top_k,
    )
    num_groups = max(1, math.ceil(num_experts / group_size))
    for name in names:
        rank = rng.permutation(num_experts) + 1
        log_base = -alpha * np.log(rank.astype(np.float64))
        group = rng.permutation(num_experts) % num_groups
        boost = np.where(group[None, :] == np.arange(num_groups)[:, None], topic_boost, 0.0)  # [G, E]
        for _ in range(num_batches):
            z = rng.standard_normal(num_groups)
            log_p = log_base + drift * z[group]
            p = np.exp(log_p - log_p.max())
            group_mass = np.bincount(group, weights=p, minlength=num_groups)
            topic = rng.choice(num_groups, size=tokens_per_batch, p=group_mass / group_mass.sum())
            # Gumbel top-k: k distinct experts per token, drawn in proportion to the boosted weights.
            scores = log_p[None, :] + boost[topic] + rng.gumbel(size=(tokens_per_batch, num_experts))
            if top_k == num_experts:
                chosen = np.broadcast_to(np.arange(num_experts), (tokens_per_batch, num_experts))
            else:
                chosen = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
            counts = np.bincount(chosen.reshape(-1), minlength=num_experts).astype(np.int64)
            pair = (chosen[:, :, None] * num_experts + chosen[:, None, :]).reshape(-1)
            co = np.bincount(pair, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
            trace.add_batch(name, counts, co.astype(np.int64))
    return trace
