"""Replay one layer's routing trace through an eviction policy and count hits and misses.

Convention (all policies, Belady included): the cache starts cold, so each expert's first load is
a miss; a needed expert counts once per step (one hit or one miss), however many tokens it serves;
pinned experts are loaded on first use into their reserved slots. ``hits + misses`` is therefore the
same for every policy on a trace, and hit rates are directly comparable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .belady import belady
from .policies import POLICY_NAMES, make_policy
from .stats import CacheSimResult
from .traces import TraceLike, as_trace

__all__ = ["hit_rate_curve", "simulate"]


def simulate(
    trace: TraceLike,
    policy_name: str,
    num_slots: int,
    *,
    num_experts: int | None = None,
    pinned: Iterable[int] = (),
    counts: Sequence[Sequence[int]] | None = None,
    use_counts: bool = True,
    **options: float,
) -> CacheSimResult:
    """Replay ``trace`` through one policy with ``num_slots`` slots.

    Args:
        trace: a :class:`~hf_moe_opt.cache.traces.RoutingTrace` or a sequence of steps, each the
            experts one forward needs, in routing order.
        policy_name: a name :func:`~hf_moe_opt.cache.policies.make_policy` accepts, or
            ``"belady"`` for the offline optimum.
        num_slots: GPU slots, pinned ones included.
        num_experts: experts in the layer (default: from the trace).
        pinned: experts never evicted.
        counts: per-step token counts for a plain trace (a ``RoutingTrace`` carries its own).
        use_counts: pass the token counts to the policy (only ``"lfru"`` looks at them).
        **options: policy options (see :func:`~hf_moe_opt.cache.policies.make_policy`).

    Returns:
        A :class:`~hf_moe_opt.cache.stats.CacheSimResult`.

    Raises:
        ValueError: an unknown policy, impossible settings, or a malformed trace.
    """
    tr = as_trace(trace, num_experts, counts)
    if str(policy_name).lower() == "belady":
        if options:
            raise ValueError(f"policy 'belady' takes no options, got {sorted(options)}")
        return belady(tr, num_slots, pinned=pinned)
    policy = make_policy(policy_name, num_slots, tr.num_experts, pinned, **options)
    step_counts = tr.counts if (use_counts and tr.counts is not None) else None
    hits = 0
    per_step: list[int] = []
    for t, step in enumerate(tr.steps):
        out = policy.step(step, None if step_counts is None else step_counts[t])
        hits += len(out.hits)
        per_step.append(len(out.misses))
    return CacheSimResult(policy.name, int(num_slots), hits, sum(per_step), tuple(per_step))


def hit_rate_curve(
    trace: TraceLike,
    policies: Sequence[str] = POLICY_NAMES,
    slot_counts: Sequence[int] = (),
    *,
    num_experts: int | None = None,
    pinned: Iterable[int] = (),
    counts: Sequence[Sequence[int]] | None = None,
    include_belady: bool = True,
) -> dict[str, list[float]]:
    """Hit rate of each policy at each slot count, ready to plot against ``slot_counts``.

    Args:
        trace: as for :func:`simulate`.
        policies: policy names (default: every online policy).
        slot_counts: slot counts to evaluate; default every count from 1 to ``num_experts``.
        num_experts, pinned, counts: as for :func:`simulate`.
        include_belady: add the offline optimum under the key ``"belady"``.

    Returns:
        ``{policy name: [hit rate at slot_counts[0], ...]}``, plus ``"belady"``.

    Raises:
        ValueError: as :func:`simulate`, for example a slot count below the number pinned.
    """
    tr = as_trace(trace, num_experts, counts)
    pinned = tuple(pinned)
    slots = list(slot_counts) if len(slot_counts) else list(range(1, tr.num_experts + 1))
    names = [str(p).lower() for p in policies]
    if include_belady and "belady" not in names:
        names.append("belady")
    return {name: [simulate(tr, name, s, pinned=pinned).hit_rate for s in slots] for name in names}
