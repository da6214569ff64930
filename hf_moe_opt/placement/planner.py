"""Plan expert placement across devices from routing history (load balancing, Huang et al. Sec. 6).

Strategies (all per layer, deterministic, ties broken by the lower expert / device index):

``round_robin``
    Expert ``j`` on device ``j % D``: the baseline, blind to load.
``greedy``
    The paper's method: experts sorted by mean historical load, descending; each goes to the
    least-loaded device that still has room. Every device holds ``E / D`` experts, so every device
    holds the same weight memory.
``anticorrelation``
    The paper's variant for the MT decoder, whose experts tend to be busy together: greedy, but a
    device's score is its load (in units of the ideal per-device load) plus ``correlation_weight``
    (0.5) times the Pearson correlation between the candidate expert's per-batch load and the
    summed per-batch load of the experts already on that device (0 while it is empty).
    Correlated experts end up apart, so their bursts land on different devices. Equal expert
    counts, as greedy.
``replicate``
    Greedy first; then every device gets ``spare_slots`` extra slots per layer for redundant copies.
    One copy at a time, the planner adds the (expert, device, share of the expert's tokens moved
    there) that most lowers the mean over the trace's batches of ``max / mean`` device load, among
    the hottest experts; then it refines the shares of every replicated expert by coordinate
    descent on the same objective. Working per batch, not on mean loads, it also spreads the
    bursts of hot experts. Slots where no copy helps stay empty.

Loads are mean tokens per batch from the trace (for correlation: each expert's fraction of the
batch's tokens, so batch size does not correlate everything with everything).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .plan import PlacementPlan, Replica
from .trace import RoutingTrace

STRATEGIES = ("round_robin", "greedy", "anticorrelation", "replicate")
DEFAULT_CORRELATION_WEIGHT = 0.5
_EQUAL_COUNT_STRATEGIES = ("greedy", "anticorrelation", "replicate")
_REFINE_ROUNDS = 200
_EPS = 1e-12


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _relative_load(counts: np.ndarray, num_devices: int) -> np.ndarray:
    """Mean tokens per batch of each expert, in units of the ideal per-device load."""
    mean = counts.astype(np.float64).mean(axis=0)
    total = mean.sum()
    if total <= 0:
        return np.zeros_like(mean)
    return mean * (num_devices / total)


def _batch_fractions(counts: np.ndarray) -> np.ndarray:
    """``[B, E]`` each expert's fraction of the batch's tokens (rows of zeros stay zero)."""
    c = counts.astype(np.float64)
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two series; 0 when either is constant."""
    xc = x - x.mean()
    yc = y - y.mean()
    denom = float(np.sqrt((xc @ xc) * (yc @ yc)))
    if denom <= _EPS:
        return 0.0
    return float((xc @ yc) / denom)


def _round_robin(num_experts: int, num_devices: int) -> list[int]:
    return [e % num_devices for e in range(num_experts)]


def _greedy(
    load: np.ndarray,
    num_devices: int,
    series: np.ndarray | None = None,
    correlation_weight: float = 0.0,
) -> list[int]:
    """Home device per expert: hottest first, to the lowest-scoring device with room.

    Score = device load, plus ``correlation_weight`` x Pearson correlation of the expert's per-batch
    series with the summed series of the device's experts when ``series`` (``[B, E]``) is given.
    """
    num_experts = load.shape[0]
    capacity = num_experts // num_devices
    order = np.argsort(-load, kind="stable")
    dev_load = np.zeros(num_devices)
    dev_count = np.zeros(num_devices, dtype=np.int64)
    dev_series = None if series is None else np.zeros((series.shape[0], num_devices))
    home = [0] * num_experts
    for e in order:
        score = dev_load.copy()
        if dev_series is not None and series is not None:
            for d in range(num_devices):
                if dev_count[d] > 0:
                    score[d] += correlation_weight * _pearson(series[:, e], dev_series[:, d])
        score[dev_count >= capacity] = np.inf
        d = int(np.argmin(score))  # first minimum: ties go to the lower device index
        home[int(e)] = d
        dev_load[d] += load[e]
        dev_count[d] += 1
        if dev_series is not None and series is not None:
            dev_series[:, d] += series[:, e]
    return home


def _imbalance(loads: np.ndarray, batch_mean: np.ndarray) -> float:
    """Mean over batches of ``max_d load / mean_d load`` for ``[B, D]`` loads."""
    return float((loads.max(axis=1) / batch_mean).mean())


def _replicate(
    counts: np.ndarray, home: list[int], num_devices: int, spare_slots: int, share_steps: int = 8
) -> list[list[Replica]]:
    """Add copies of hot experts in the spare slots and split their tokens between the copies.

    Works directly on the objective the plan is judged by: the mean over the given batches of the
    busiest device's load over the mean device load. Each step adds the single copy (expert,
    device, share moved to it) that lowers that objective most; then the shares of every replicated
    expert are refined by coordinate descent. Both stop when nothing improves, so slots may stay
    empty when copies would not help.
    """
    num_batches, num_experts = counts.shape
    c = counts.astype(np.float64)
    batch_total = c.sum(axis=1)
    active = batch_total > 0
    if not active.any():
        return [[(h, 1.0)] for h in home]
    c = c[active]
    batch_mean = batch_total[active] / num_devices
    shares = np.zeros((num_experts, num_devices))
    shares[np.arange(num_experts), home] = 1.0
    copies: list[list[int]] = [[h] for h in home]  # device order per expert: home first
    free = np.full(num_devices, spare_slots, dtype=np.int64)
    loads = c @ shares
    best = _imbalance(loads, batch_mean)
    fractions = np.arange(1, share_steps + 1) / (share_steps + 1)
    mean_load = c.mean(axis=0)
    # Only experts that can matter: the hottest few per device (a copy of a cold expert moves little).
    candidates = np.argsort(-mean_load, kind="stable")[: min(num_experts, 4 * num_devices * (spare_slots + 1))]

    for _ in range(spare_slots * num_devices):
        choice = None
        for e in candidates:
            col = c[:, e][:, None]
            for dst in range(num_devices):
                if free[dst] == 0 or shares[e, dst] > 0 or dst in copies[e]:
                    continue
                unit = -shares[e]
                unit[dst] += 1.0
                # All fractions at once: [T, B, D] loads after moving fraction t of e's tokens to dst.
                trial = loads[None] + fractions[:, None, None] * (col * unit[None, :])[None]
                values = (trial.max(axis=2) / batch_mean[None]).mean(axis=1)
                i = int(np.argmin(values))
                if values[i] < best - 1e-12:
                    best, choice = float(values[i]), (int(e), dst, float(fractions[i]))
        if choice is None:
            break
        e, dst, t = choice
        delta = -t * shares[e]
        delta[dst] += t
        shares[e] += delta
        loads += c[:, e][:, None] * delta[None, :]
        copies[e].append(dst)
        free[dst] -= 1

    # Coordinate descent on the shares: move part of an expert's tokens between two of its copies.
    replicated = [e for e in range(num_experts) if len(copies[e]) > 1]
    steps = (0.5, 0.25, 0.1, 0.05, 0.02, 0.01)
    for _ in range(_REFINE_ROUNDS):
        improved = False
        for e in replicated:
            col = c[:, e][:, None]
            for src in copies[e]:
                for dst in copies[e]:
                    if src == dst:
                        continue
                    for step in steps:
                        amount = min(step, shares[e, src])
                        if amount <= 0:
                            continue
                        delta = np.zeros(num_devices)
                        delta[src] -= amount
                        delta[dst] += amount
                        value = _imbalance(loads + col * delta[None, :], batch_mean)
                        if value < best - 1e-12:
                            best = value
                            shares[e] += delta
                            loads += col * delta[None, :]
                            improved = True
                            break
        if not improved:
            break

    plan: list[list[Replica]] = []
    for e in range(num_experts):
        devs = copies[e]
        row = np.clip(shares[e, devs], 0.0, None)
        row = row / row.sum()
        plan.append([(d, float(s)) for d, s in zip(devs, row, strict=True)])
    return plan


def plan_placement(
    trace: RoutingTrace,
    num_devices: int,
    strategy: str = "greedy",
    spare_slots: int = 0,
    *,
    layers: Sequence[str] | None = None,
    correlation_weight: float | None = None,
) -> PlacementPlan:
    """Plan where every expert of every traced layer lives.

    Args:
        trace: routing history to plan from (use :meth:`RoutingTrace.split` to keep batches apart
            for evaluation).
        num_devices: devices to spread the experts over (``>= 1``).
        strategy: one of ``"round_robin"``, ``"greedy"``, ``"anticorrelation"``, ``"replicate"``.
        spare_slots: extra expert slots per device per layer for redundant copies; ``replicate``
            only, and it needs at least one.
        layers: plan only these layers (default: every layer in the trace).
        correlation_weight: weight of the correlation term of ``anticorrelation`` (default 0.5).

    Returns:
        A :class:`PlacementPlan` with one entry per planned layer.

    Raises:
        ValueError: invalid argument combinations, or an expert count that does not divide evenly
            over the devices for a strategy that places equal counts.
    """
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    num_devices = _check_int("num_devices", num_devices, 1)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    spare_slots = _check_int("spare_slots", spare_slots, 0)
    if strategy == "replicate" and spare_slots < 1:
        raise ValueError("strategy 'replicate' needs spare_slots >= 1 (extra expert copies per device)")
    if strategy != "replicate" and spare_slots:
        raise ValueError(f"spare_slots={spare_slots} only applies to strategy 'replicate', not {strategy!r}")
    if correlation_weight is not None and strategy != "anticorrelation":
        raise ValueError(f"correlation_weight only applies to strategy 'anticorrelation', not {strategy!r}")
    weight = DEFAULT_CORRELATION_WEIGHT if correlation_weight is None else float(correlation_weight)
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(
            f"correlation_weight must be >= 0 and finite (it keeps correlated experts apart): {correlation_weight!r}"
        )

    if isinstance(layers, str):
        raise TypeError(f"layers= takes a list of layer names, got the string {layers!r}")
    names = trace.layers if layers is None else list(layers)
    if not names:
        raise ValueError("the trace holds no layers to plan")
    unknown = [n for n in names if n not in trace.layers]
    if unknown:
        raise ValueError(f"layers= names layers the trace lacks: {unknown[:4]}; it holds {trace.layers[:4]}...")
    num_experts = trace.num_experts
    if num_experts is None:
        raise ValueError("the trace does not know its number of experts")
    if strategy in _EQUAL_COUNT_STRATEGIES and num_experts % num_devices:
        raise ValueError(
            f"strategy {strategy!r} puts the same number of experts on every device (so each holds "
            f"the same weight memory), but {num_experts} experts do not divide evenly over "
            f"{num_devices} devices; use a device count that divides {num_experts}, or 'round_robin'"
        )

    planned: dict[str, list[list[Replica]]] = {}
    for name in names:
        counts = trace.counts(name)
        if strategy == "round_robin":
            home = _round_robin(num_experts, num_devices)
            planned[name] = [[(d, 1.0)] for d in home]
            continue
        load = _relative_load(counts, num_devices)
        if strategy == "anticorrelation":
            home = _greedy(load, num_devices, _batch_fractions(counts), weight)
        else:
            home = _greedy(load, num_devices)
        if strategy == "replicate":
            planned[name] = _replicate(counts, home, num_devices, spare_slots)
        else:
            planned[name] = [[(d, 1.0)] for d in home]

    metadata: dict[str, object] = {"num_batches": {name: trace.num_batches(name) for name in names}}
    if trace.model_name is not None:
        metadata["model_name"] = trace.model_name
    if strategy == "replicate":
        metadata["spare_slots"] = spare_slots
    if strategy == "anticorrelation":
        metadata["correlation_weight"] = weight
    return PlacementPlan(num_devices=num_devices, strategy=strategy, layers=planned, metadata=metadata)
