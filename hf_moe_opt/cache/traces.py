"""Routing traces for the cache simulator: the experts each step of one MoE layer needs.

A trace is a sequence of steps; a step is the experts one forward of the layer routes to, in routing
order, with the tokens routed to each when known. :class:`RoutingTrace` holds both; the simulator
also takes a plain list of expert-id collections.

:func:`synthetic_trace` draws skewed, temporally local traces (numpy only, seeded);
:func:`trace_from_counts` and :func:`trace_from_assignments` convert recorded routing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RoutingTrace",
    "TraceLike",
    "as_trace",
    "synthetic_trace",
    "trace_from_assignments",
    "trace_from_counts",
]


@dataclass(frozen=True)
class RoutingTrace:
    """One layer's routing history, one entry per step.

    Attributes:
        steps: the distinct experts of each step, in routing order.
        counts: tokens routed to each expert of ``steps`` (same shape), or ``None`` if unknown.
        num_experts: experts in the layer; every id is in ``range(num_experts)``.
    """

    steps: tuple[tuple[int, ...], ...]
    counts: tuple[tuple[int, ...], ...] | None
    num_experts: int

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.counts is not None and len(self.counts) != len(self.steps):
            raise ValueError(f"counts has {len(self.counts)} steps but steps has {len(self.steps)}")
        for t, step in enumerate(self.steps):
            if len(set(step)) != len(step):
                raise ValueError(f"step {t} repeats an expert: {step}")
            for e in step:
                if not 0 <= e < self.num_experts:
                    raise ValueError(f"step {t}: expert id {e} out of range [0, {self.num_experts})")
            if self.counts is not None and len(self.counts[t]) != len(step):
                raise ValueError(f"step {t}: {len(self.counts[t])} counts for {len(step)} experts")

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.steps)

    def __getitem__(self, index: int) -> tuple[int, ...]:
        return self.steps[index]

    def count_matrix(self) -> np.ndarray:
        """``[steps, num_experts]`` int64 token counts (1 per needed expert when counts are unknown)."""
        out = np.zeros((len(self.steps), self.num_experts), dtype=np.int64)
        for t, step in enumerate(self.steps):
            out[t, list(step)] = self.counts[t] if self.counts is not None else 1
        return out

    def distinct_per_step(self) -> np.ndarray:
        """``[steps]`` number of distinct experts each step needs."""
        return np.array([len(s) for s in self.steps], dtype=np.int64)


TraceLike = RoutingTrace | Sequence[Iterable[int]]
"""A :class:`RoutingTrace`, or a sequence of steps, each an iterable of expert ids."""


def _refuse_ambiguous(trace: object) -> None:
    """Inputs that would otherwise be read as steps of expert ids and give wrong hit rates silently."""
    if hasattr(trace, "counts") and hasattr(trace, "layers"):  # a profile's per-layer trace
        raise TypeError(
            "a profile trace holds every MoE layer's counts: pass one layer's steps, "
            "hf_moe_opt.cache.trace_from_counts(trace.counts(layer))"
        )
    ndim = getattr(trace, "ndim", None)
    if ndim is not None:
        # [steps, experts] counts and [steps, k] router choices look alike; a list of steps does not.
        raise TypeError(
            f"a {ndim}-D array is ambiguous as a trace: pass trace_from_counts(counts) for a "
            "[steps, experts] count matrix, trace_from_assignments(expert_index, num_experts) for "
            "router choices, or a list of steps (each the expert ids one forward needs)"
        )


def as_trace(
    trace: TraceLike, num_experts: int | None = None, counts: Sequence[Sequence[int]] | None = None
) -> RoutingTrace:
    """Normalise ``trace`` into a :class:`RoutingTrace`.

    Repeated ids inside a step are merged (keeping the first position, adding their counts).

    Args:
        trace: a :class:`RoutingTrace` or a sequence of steps.
        num_experts: experts in the layer; default the trace's own, else the largest id plus one.
        counts: per-step token counts aligned with ``trace``'s steps (plain traces only).

    Raises:
        ValueError: negative or out-of-range ids, misaligned counts, or ``counts`` given with a
            :class:`RoutingTrace`.
        TypeError: an array or tensor (a count matrix and router choices look alike: use
            :func:`trace_from_counts` or :func:`trace_from_assignments`) or a profile's multi-layer
            trace.
    """
    if isinstance(trace, RoutingTrace):
        if counts is not None:
            raise ValueError("counts must not be given with a RoutingTrace; it carries its own")
        if num_experts is None or int(num_experts) == trace.num_experts:
            return trace
        return RoutingTrace(trace.steps, trace.counts, int(num_experts))
    _refuse_ambiguous(trace)
    raw = [[int(e) for e in step] for step in trace]
    if counts is not None and len(counts) != len(raw):
        raise ValueError(f"counts has {len(counts)} steps but the trace has {len(raw)}")
    steps: list[tuple[int, ...]] = []
    merged_counts: list[tuple[int, ...]] = []
    for t, step in enumerate(raw):
        if counts is not None and len(counts[t]) != len(step):
            raise ValueError(f"step {t}: {len(counts[t])} counts for {len(step)} experts")
        merged: dict[int, int] = {}
        for i, e in enumerate(step):
            if e < 0:
                raise ValueError(f"step {t}: negative expert id {e}")
            merged[e] = merged.get(e, 0) + (int(counts[t][i]) if counts is not None else 0)
        steps.append(tuple(merged))
        merged_counts.append(tuple(merged.values()))
    if num_experts is None:
        num_experts = max((max(s) for s in steps if s), default=-1) + 1
        num_experts = max(num_experts, 1)
    return RoutingTrace(tuple(steps), tuple(merged_counts) if counts is not None else None, int(num_experts))


def trace_from_counts(count_matrix: np.ndarray | Sequence[Sequence[int]]) -> RoutingTrace:
    """Convert a ``[steps, num_experts]`` token-count matrix into a trace.

    Each step lists the experts with a positive count in increasing id order (a count matrix holds
    no routing order).

    Raises:
        ValueError: the matrix is not 2-D or holds negative counts.
    """
    m = np.asarray(count_matrix)
    if m.ndim != 2:
        raise ValueError(f"expected a [steps, num_experts] matrix, got shape {m.shape}")
    if m.size and (m < 0).any():
        raise ValueError("token counts must be non-negative")
    steps, counts = [], []
    for row in m:
        idx = np.flatnonzero(row > 0)
        steps.append(tuple(int(e) for e in idx))
        counts.append(tuple(int(c) for c in row[idx]))
    return RoutingTrace(tuple(steps), tuple(counts), max(int(m.shape[1]), 1))


def trace_from_assignments(expert_index: np.ndarray, num_experts: int) -> RoutingTrace:
    """Convert recorded top-k choices ``[steps, tokens, k]`` into a trace.

    Routing order is the order of first appearance scanning tokens, then the ``k`` choices of each
    token; counts are the number of assignments each expert received. Negative ids (dropped or
    padding assignments) are ignored.

    Raises:
        ValueError: the array is not 3-D or holds ids ``>= num_experts``.
    """
    idx = np.asarray(expert_index)
    if idx.ndim != 3:
        raise ValueError(f"expected [steps, tokens, k] expert ids, got shape {idx.shape}")
    if idx.size and idx.max() >= num_experts:
        raise ValueError(f"expert id {int(idx.max())} out of range [0, {num_experts})")
    steps, counts = [], []
    for step in idx.reshape(idx.shape[0], -1):
        step = step[step >= 0]
        uniq, first, cnt = np.unique(step, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        steps.append(tuple(int(e) for e in uniq[order]))
        counts.append(tuple(int(c) for c in cnt[order]))
    return RoutingTrace(tuple(steps), tuple(counts), int(num_experts))


def synthetic_trace(
    num_experts: int,
    top_k: int,
    tokens_per_step: int,
    num_steps: int,
    *,
    zipf_s: float = 1.0,
    stickiness: float = 0.5,
    reshuffle_every: int | None = None,
    seed: int = 0,
) -> RoutingTrace:
    """Draw a skewed routing trace with temporal locality.

    Experts get Zipf popularity ``1 / rank**zipf_s`` with ranks in a seeded random order. Step ``t``
    routes each token to ``top_k`` distinct experts drawn without replacement from the mixture
    ``stickiness * usage[t-1] + (1 - stickiness) * popularity``, where ``usage[t-1]`` is the
    previous step's share of routed tokens: each draw reuses the previous step's experts with
    probability about ``stickiness`` (a sticky Markov process). Step 0 draws from the popularity
    alone. With ``reshuffle_every``, the popularity ranks are redrawn every that many steps
    (phase changes, where frequency alone goes stale).

    Args:
        num_experts: experts in the layer.
        top_k: experts per token (``<= num_experts``).
        tokens_per_step: tokens routed in each step.
        num_steps: steps to draw.
        zipf_s: skew exponent (0: uniform).
        stickiness: reuse probability in ``[0, 1]``.
        reshuffle_every: steps between popularity redraws, or ``None`` for a fixed popularity.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        A :class:`RoutingTrace` with counts; each step lists experts in order of first appearance
        (tokens in order, each token's choices by decreasing sampled score).

    Raises:
        ValueError: any argument out of range.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not zipf_s >= 0:
        raise ValueError(f"zipf_s must be >= 0, got {zipf_s}")
    if not 0.0 <= stickiness <= 1.0:
        raise ValueError(f"stickiness must be in [0, 1], got {stickiness}")
    if reshuffle_every is not None and reshuffle_every < 1:
        raise ValueError(f"reshuffle_every must be >= 1 or None, got {reshuffle_every}")

    steps: list[tuple[int, ...]] = []
    counts: list[tuple[int, ...]] = []
    for step, cnt, _ in synthetic_steps(
        num_experts, top_k, tokens_per_step, num_steps, zipf_s, stickiness, reshuffle_every, seed
    ):
        steps.append(step)
        counts.append(cnt)
    return RoutingTrace(tuple(steps), tuple(counts), int(num_experts))


def synthetic_steps(
    num_experts: int,
    top_k: int,
    tokens_per_step: int,
    num_steps: int,
    zipf_s: float,
    stickiness: float,
    reshuffle_every: int | None,
    seed: int,
):
    """The steps of :func:`synthetic_trace` (arguments unchecked) with the distribution each was drawn
    from: yields ``(experts, counts, mix)``, ``mix`` the ``[num_experts]`` probabilities of one draw.
    What an online policy cannot see, for bounds on what it could reach."""
    rng = np.random.default_rng(seed)

    def draw_popularity() -> np.ndarray:
        ranks = rng.permutation(num_experts)
        p = 1.0 / (ranks + 1.0) ** zipf_s
        return p / p.sum()

    popularity = draw_popularity()
    usage = popularity
    for t in range(num_steps):
        if reshuffle_every is not None and t > 0 and t % reshuffle_every == 0:
            popularity = draw_popularity()
        mix = stickiness * usage + (1.0 - stickiness) * popularity if t > 0 else popularity
        with np.errstate(divide="ignore"):
            log_mix = np.log(mix)
        # Gumbel top-k: k distinct draws without replacement, proportional to ``mix``.
        keys = log_mix[None, :] + rng.gumbel(size=(tokens_per_step, num_experts))
        chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        chosen_keys = np.take_along_axis(keys, chosen, axis=1)
        chosen = np.take_along_axis(chosen, np.argsort(-chosen_keys, axis=1, kind="stable"), axis=1)
        flat = chosen.reshape(-1)
        uniq, first, cnt = np.unique(flat, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        yield tuple(int(e) for e in uniq[order]), tuple(int(c) for c in cnt[order]), mix
        usage = np.bincount(flat, minlength=num_experts) / flat.size
