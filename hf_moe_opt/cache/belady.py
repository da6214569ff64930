"""Belady's MIN over a recorded trace: the offline optimum to print beside each online policy.

On a miss with no free slot, MIN evicts the resident expert whose next use lies farthest in the
future (never used again counts as infinitely far). It follows the same rules as the online
policies (:mod:`hf_moe_opt.cache.policies`): cold start, a needed expert counts once per step,
experts needed in the current step are not evicted while another candidate exists, pinned experts
own reserved slots, and oversubscribed steps run in chunks.

Optimality: when every step's unpinned experts fit in the unpinned slots, the misses MIN reports are
the fewest any eviction policy can achieve on the trace (the classic exchange argument carries over
to steps that need a set of experts at once: every policy faces the same candidate set at a step,
and the farthest-next-use choice is never worse). The tests check this against an exhaustive search
on small traces.

Oversubscribed steps (more unpinned experts than unpinned slots) are different: a step's misses
still depend only on what was resident when it began, but the chunk rules (hits first, misses after)
constrain which experts remain at its end, and MIN only picks the load order greedily, loading the
experts needed soonest last. That is not always optimal. With one slot and the trace
``[1, 0], [0, 1], [1]``, LIFO ends step 0 holding 0, hits 0 and loads 1 in step 1, then hits 1 in
step 2 (2 hits); MIN ends step 0 holding 1 (both are next needed at step 1; the tie goes by id),
hits 1 and loads 0 in step 1, then misses 1 in step 2 (1 hit). On traces with oversubscribed steps,
MIN is a strong reference, not a bound.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from .policies import EvictionPolicy
from .stats import CacheSimResult
from .traces import TraceLike, as_trace

__all__ = ["BeladyPolicy", "belady"]


class BeladyPolicy(EvictionPolicy):
    """MIN as a policy object: it knows the whole trace and must be stepped through it in order.

    Args:
        trace: the steps the policy will be asked to serve.
        num_slots, num_experts, pinned: as for :class:`~hf_moe_opt.cache.policies.EvictionPolicy`.

    Raises:
        ValueError: as the base class, or a step that differs from the trace (at :meth:`step`).
    """

    name = "belady"

    def __init__(
        self,
        trace: Sequence[Iterable[int]],
        num_slots: int,
        num_experts: int,
        pinned: Iterable[int] = (),
    ) -> None:
        self._trace_sets = [frozenset(int(e) for e in step) for step in trace]
        self._uses: dict[int, list[int]] = {}
        for t, step in enumerate(self._trace_sets):
            for e in step:
                self._uses.setdefault(e, []).append(t)
        super().__init__(num_slots, num_experts, pinned)

    def next_use(self, expert: int, after: int | None = None) -> float:
        """First step after ``after`` (default: the current step) that needs ``expert``; inf if none."""
        after = self._step if after is None else after
        uses = self._uses.get(expert, ())
        i = bisect.bisect_right(uses, after)
        return float(uses[i]) if i < len(uses) else float("inf")

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        if self._step >= len(self._trace_sets):
            raise ValueError(f"step {self._step} is past the end of the trace ({len(self._trace_sets)} steps)")
        if frozenset(order) != self._trace_sets[self._step]:
            raise ValueError(
                f"step {self._step} needs {sorted(order)} but the trace says {sorted(self._trace_sets[self._step])}"
            )

    def _order_misses(self, misses: list[int]) -> list[int]:
        # Load the farthest-needed first, so an oversubscribed step ends holding the soonest-needed.
        return sorted(misses, key=lambda e: (-self.next_use(e), e))

    def _choose_victim(self, candidates: list[int]) -> int:
        return max(candidates, key=lambda e: (self.next_use(e), e))


def belady(
    trace: TraceLike,
    num_slots: int,
    *,
    num_experts: int | None = None,
    pinned: Iterable[int] = (),
) -> CacheSimResult:
    """Hits and misses of Belady's MIN on ``trace`` with a cold cache.

    Args:
        trace: a :class:`~hf_moe_opt.cache.traces.RoutingTrace` or a sequence of steps.
        num_slots: GPU slots, pinned ones included.
        num_experts: experts in the layer (default: from the trace).
        pinned: experts never evicted.

    Raises:
        ValueError: impossible settings (see :func:`~hf_moe_opt.cache.policies.make_policy`).
    """
    tr = as_trace(trace, num_experts)
    policy = BeladyPolicy(tr.steps, num_slots, tr.num_experts, pinned)
    hits = 0
    per_step: list[int] = []
    for step in tr.steps:
        out = policy.step(step)
        hits += len(out.hits)
        per_step.append(len(out.misses))
    return CacheSimResult("belady", int(num_slots), hits, sum(per_step), tuple(per_step))
