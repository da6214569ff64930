"""Eviction policies for expert buffering: which experts keep the GPU slots of one MoE layer.

Expert buffering (Huang et al., "Toward Efficient Inference for Mixture of Experts", NeurIPS 2024)
keeps only ``num_slots`` of a layer's ``num_experts`` experts on the GPU; the rest wait in pinned
CPU memory. This module is the pure bookkeeping part: it decides which expert occupies which slot.
It moves no weights; the GPU cache asks it what to load where and does the copies.

The model, one *step* at a time (a step is one forward of one layer over one batch):

* The caller passes the experts the batch needs, in routing order, optionally with the number of
  tokens routed to each.
* Experts already resident are **hits**; the others are **misses** and must be loaded. A needed
  expert counts once per step, however many tokens it serves.
* Each miss takes a free slot, or the slot of a *victim* the policy chooses. A victim is never an
  expert needed in the current step while any other candidate exists, and never a pinned expert.

Oversubscribed steps: when a step needs more unpinned experts than there are unpinned slots, the
step cannot hold all its experts at once and is processed in *chunks*. The first chunk is every hit
plus as many misses as fit; each later chunk holds the next ``capacity`` misses. The experts of a
chunk are computed before the next chunk loads, so the victims of a later chunk are experts this
step has already finished with (they were needed now, but no other candidate exists). Hits always
sit in the first chunk, so a hit is never evicted before it is used. :attr:`StepOutcome.chunks`
tells the compute which experts to run between loads.

Pinned experts (shared or always-hot experts) own reserved slots ``0 .. len(pinned) - 1``; they are
loaded the first time they are needed (a miss, like every first load on a cold cache) and never
evicted. Unpinned experts share the remaining slots.

Policies (``make_policy`` names):

* ``"lifo"`` — the paper's policy: evict an expert idle in the current batch first (the rule every
  policy here obeys), and among those the one loaded last (last in, first out). Early loads, which
  on a skewed router are mostly the popular experts, therefore stay put.
* ``"fifo"`` — among idle experts, evict the one loaded first.
* ``"lru"`` — evict the expert whose last use is oldest.
* ``"lfu"`` — evict the expert used in the fewest steps so far (ties: least recently used).
* ``"lfru"`` — frequency with exponential decay combined with recency: each use adds a weight that
  halves every ``half_life`` steps, and the expert with the smallest decayed sum is evicted (ties:
  least recently used). Token counts, when given, raise the weight of heavily used experts. This is
  the combined recency/frequency value of LRFU (Lee et al., 2001): a short half-life behaves like
  LRU, a long one like LFU.
* ``"adaptive"`` — LFU that forgets when the routing popularity changes: it counts uses since the
  last change it detected (a likelihood-ratio test on the experts each step newly needs) and evicts
  the expert with the smallest count (ties: least recently used). With a fixed popularity it keeps
  LFU's long memory; after a change it drops the stale counts within a few steps, where a decayed
  score (``"lfru"``) has to compromise between the two.
* ``"changepoint"`` — the same idea without a hard decision: a Bayesian online change-point model
  keeps several hypotheses of when the popularity last changed, each counting uses since then, and
  weighs them by how well they predicted the experts newly needed; the victim is the expert least
  likely under that mixture. Closest to Belady on most measured traces, the default of ``optimize``
  (:data:`DEFAULT_POLICY`).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AdaptiveLFUPolicy",
    "ChangePointPolicy",
    "EvictionPolicy",
    "FIFOPolicy",
    "LFRUPolicy",
    "LFUPolicy",
    "LIFOPolicy",
    "LRUPolicy",
    "DEFAULT_POLICY",
    "Load",
    "POLICY_NAMES",
    "StepOutcome",
    "make_policy",
]


@dataclass(frozen=True)
class Load:
    """One expert copied into one slot.

    Attributes:
        expert: the expert loaded.
        slot: the slot it goes to, in ``range(num_slots)``.
        evicted: the expert that held the slot before, or ``None`` for a free slot.
        chunk: index into :attr:`StepOutcome.chunks` of the chunk that needs this load.
    """

    expert: int
    slot: int
    evicted: int | None
    chunk: int


@dataclass(frozen=True)
class StepOutcome:
    """What one step did to the cache.

    Attributes:
        hits: needed experts that were resident when the step began, in routing order.
        misses: needed experts that had to be loaded, in routing order.
        loads: the copies to perform, in the order the policy made them.
        chunks: the needed experts grouped into the chunks that are resident together; one chunk
            unless the step was oversubscribed. Within a chunk, experts keep routing order.
    """

    hits: tuple[int, ...]
    misses: tuple[int, ...]
    loads: tuple[Load, ...]
    chunks: tuple[tuple[int, ...], ...]

    @property
    def evicted(self) -> tuple[int, ...]:
        """Experts evicted during the step, in eviction order."""
        return tuple(ld.evicted for ld in self.loads if ld.evicted is not None)


def _normalise_step(
    needed: Iterable[int], counts: Sequence[int] | None, num_experts: int
) -> tuple[list[int], dict[int, int] | None]:
    """Deduplicate ``needed`` keeping first-seen order, merge counts, and check the ids."""
    needed = [int(e) for e in needed]
    if counts is not None and len(counts) != len(needed):
        raise ValueError(f"counts has {len(counts)} entries but needed has {len(needed)}")
    # Fast path for the usual input (distinct ids in range, counts >= 0): no per-entry Python loop.
    if not needed:
        return needed, ({} if counts is not None else None)
    if len(set(needed)) == len(needed) and min(needed) >= 0 and max(needed) < num_experts:
        if counts is None:
            return needed, None
        counts = [int(c) for c in counts]
        if min(counts) >= 0:
            return needed, dict(zip(needed, counts, strict=True))
    order: list[int] = []
    merged: dict[int, int] = {}
    for i, e in enumerate(needed):
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} out of range [0, {num_experts})")
        if e not in merged:
            order.append(e)
            merged[e] = 0
        if counts is not None:
            c = int(counts[i])
            if c < 0:
                raise ValueError(f"token count {c} for expert {e} is negative")
            merged[e] += c
    return order, (merged if counts is not None else None)


def _whole(value: object) -> bool:
    """A finite number with no fractional part (an int option given as ``8`` or ``8.0``; not inf/NaN)."""
    try:
        return math.isfinite(value) and value == int(value)
    except (TypeError, ValueError):
        return False


class EvictionPolicy(ABC):
    """Slot bookkeeping for one MoE layer; subclasses only rank eviction candidates.

    Args:
        num_slots: GPU slots for this layer's experts (pinned ones included).
        num_experts: experts in the layer; ids are ``0 .. num_experts - 1``.
        pinned: experts that are never evicted. They own slots ``0 .. len(pinned) - 1``.

    Raises:
        ValueError: ``num_slots < 1``, ``num_experts < 1``, a pinned id out of range or repeated,
            more pinned experts than slots, or every slot pinned while unpinned experts remain
            (they could never be loaded).
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    """Keyword options the constructor takes (what :func:`make_policy` passes through)."""

    def __init__(self, num_slots: int, num_experts: int, pinned: Iterable[int] = ()) -> None:
        num_slots, num_experts = int(num_slots), int(num_experts)
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        pinned_list = [int(e) for e in pinned]
        for e in pinned_list:
            if not 0 <= e < num_experts:
                raise ValueError(f"pinned expert id {e} out of range [0, {num_experts})")
        if len(set(pinned_list)) != len(pinned_list):
            raise ValueError(f"pinned experts repeat an id: {pinned_list}")
        if len(pinned_list) > num_slots:
            raise ValueError(f"{len(pinned_list)} pinned experts do not fit in {num_slots} slots")
        if len(pinned_list) == num_slots and num_experts > num_slots:
            raise ValueError(
                f"all {num_slots} slots are pinned, so the other {num_experts - num_slots} experts "
                "could never be loaded; leave at least one slot unpinned"
            )
        self.num_slots = num_slots
        self.num_experts = num_experts
        self.pinned: tuple[int, ...] = tuple(pinned_list)
        self._pinned_slot = {e: s for s, e in enumerate(self.pinned)}
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Empty the cache (cold start) and forget all history."""
        self._slot_of: dict[int, int] = {}
        # Free unpinned slots, popped from the end so the lowest slot is used first.
        self._free: list[int] = list(range(self.num_slots - 1, len(self.pinned) - 1, -1))
        self._step = 0  # index of the step being processed
        self._tick = 0  # counts uses, in routing order, across all steps
        self._seq = 0  # counts loads
        self._reset_history()

    @property
    def capacity(self) -> int:
        """Slots shared by unpinned experts."""
        return self.num_slots - len(self.pinned)

    @property
    def resident(self) -> frozenset[int]:
        """Experts currently in a slot."""
        return frozenset(self._slot_of)

    @property
    def steps_seen(self) -> int:
        """Steps processed since construction or the last :meth:`reset`."""
        return self._step

    def slot_of(self, expert: int) -> int | None:
        """The slot holding ``expert``, or ``None`` if it is not resident."""
        return self._slot_of.get(int(expert))

    def is_pinned(self, expert: int) -> bool:
        """Whether ``expert`` is pinned."""
        return int(expert) in self._pinned_slot

    # ------------------------------------------------------------------ step
    def step(self, needed: Iterable[int], counts: Sequence[int] | None = None) -> StepOutcome:
        """Serve one step: count hits, load misses, evict victims.

        Args:
            needed: experts the batch routes to, in routing order; repeats are merged.
            counts: optional tokens routed to each entry of ``needed`` (same length).

        Returns:
            The hits, misses, loads and chunks of the step (see :class:`StepOutcome`).

        Raises:
            ValueError: an expert id out of range, a negative count, or ``counts`` of the wrong
                length.
        """
        order, count_of = _normalise_step(needed, counts, self.num_experts)
        self._begin_step(order, count_of)
        slot_of = self._slot_of
        if all(e in slot_of for e in order):
            outcome = self._serve_hits(order, count_of)
        else:
            outcome = self._serve(order, count_of)
        self._end_step(order, count_of)
        self._step += 1
        return outcome

    def _serve_hits(self, order: list[int], count_of: dict[int, int] | None) -> StepOutcome:
        """:meth:`_serve` for a step whose experts are all resident (the common decode step): no
        load, no eviction, one chunk, the same history updates, none of the general path's lists."""
        pinned = self._pinned_slot
        for e in order:
            if e not in pinned:
                self._tick += 1
                self._on_use(e, self._tick, None if count_of is None else count_of[e])
        hits = tuple(order)
        return StepOutcome(hits, (), (), (hits,))

    def _serve(self, order: list[int], count_of: dict[int, int] | None) -> StepOutcome:
        """Hits, loads, evictions and chunks of one step (``order``: distinct experts, routing order)."""
        position = {e: i for i, e in enumerate(order)}
        step_set = set(order)
        hits = [e for e in order if e in self._slot_of]
        misses = [e for e in order if e not in self._slot_of]
        pinned_misses = [e for e in misses if e in self._pinned_slot]
        unpinned_misses = self._order_misses([e for e in misses if e not in self._pinned_slot])
        unpinned_hits = sum(1 for e in hits if e not in self._pinned_slot)

        first = self.capacity - unpinned_hits
        groups = [unpinned_misses[:first]]
        rest = unpinned_misses[first:]
        while rest:
            groups.append(rest[: self.capacity])
            rest = rest[self.capacity :]

        loads: list[Load] = []
        chunks: list[tuple[int, ...]] = []
        done: set[int] = set()  # unpinned experts of this step already computed
        for c, group in enumerate(groups):
            members = list(group)
            if c == 0:
                members += hits + pinned_misses
                for e in pinned_misses:
                    slot = self._pinned_slot[e]
                    self._slot_of[e] = slot
                    loads.append(Load(e, slot, None, 0))
            for e in group:
                slot, victim = self._take_slot(step_set, done)
                self._slot_of[e] = slot
                self._seq += 1
                self._on_load(e, self._seq)
                loads.append(Load(e, slot, victim, c))
            members.sort(key=position.__getitem__)
            for e in members:
                if e not in self._pinned_slot:
                    self._tick += 1
                    self._on_use(e, self._tick, None if count_of is None else count_of[e])
                    done.add(e)
            chunks.append(tuple(members))
        return StepOutcome(tuple(hits), tuple(misses), tuple(loads), tuple(chunks))

    def prefetch(self, experts: Iterable[int]) -> tuple[Load, ...]:
        """Make room for experts expected in the next step (look-ahead), before it is known.

        Each expert of ``experts`` not yet resident gets a slot: a pinned one its reserved slot, an
        unpinned one a free slot, else a victim's, ranked by the policy among the resident unpinned
        experts outside ``experts``; with no such candidate left the remaining unpinned ones are
        skipped (pinned ones still take their reserved slots). A prefetch is a
        load (it updates load order) but neither a step nor a use: a wrong guess leaves the
        frequencies and recencies the policy ranks by untouched. Returns the loads (chunk 0).
        """
        wanted = list(dict.fromkeys(int(e) for e in experts))
        for e in wanted:
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")
        keep = set(wanted)
        loads: list[Load] = []
        for e in wanted:
            if e in self._slot_of:
                continue
            if e in self._pinned_slot:
                self._slot_of[e] = self._pinned_slot[e]
                loads.append(Load(e, self._pinned_slot[e], None, 0))
                continue
            if not self._free and all(r in self._pinned_slot or r in keep for r in self._slot_of):
                continue  # every resident is pinned or wanted: nothing may go (pinned ones still load)
            slot, victim = self._take_slot(keep, set())
            self._slot_of[e] = slot
            self._seq += 1
            self._on_load(e, self._seq)
            loads.append(Load(e, slot, victim, 0))
        return tuple(loads)

    def _take_slot(self, step_set: set[int], done: set[int]) -> tuple[int, int | None]:
        """A slot for one unpinned load: a free one, else a victim's."""
        if self._free:
            return self._free.pop(), None
        idle = [e for e in self._slot_of if e not in self._pinned_slot and e not in step_set]
        candidates = idle if idle else [e for e in self._slot_of if e in done]
        if not candidates:  # pragma: no cover - excluded by the chunk sizes
            raise RuntimeError("no eviction candidate; the chunking invariant was broken")
        victim = self._choose_victim(candidates)
        if victim not in candidates:  # pragma: no cover - guards subclasses
            raise RuntimeError(f"{type(self).__name__} chose {victim}, not a candidate")
        slot = self._slot_of.pop(victim)
        self._on_evict(victim)
        return slot, victim

    # ----------------------------------------------------------------- hooks
    def _reset_history(self) -> None:  # noqa: B027 - optional hook
        """Forget per-expert history; called by :meth:`reset`."""

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:  # noqa: B027
        """Called before any load of a step."""

    def _end_step(self, order: list[int], counts: dict[int, int] | None) -> None:  # noqa: B027
        """Called after the last load of a step."""

    def _order_misses(self, misses: list[int]) -> list[int]:
        """Order in which unpinned misses load (matters only for oversubscribed steps)."""
        return misses

    def _on_load(self, expert: int, seq: int) -> None:  # noqa: B027 - optional hook
        """``expert`` was loaded; ``seq`` increases with every load."""

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:  # noqa: B027
        """``expert`` served the current step; ``tick`` increases with every use."""

    def _on_evict(self, expert: int) -> None:  # noqa: B027 - optional hook
        """``expert`` left the cache."""

    @abstractmethod
    def _choose_victim(self, candidates: list[int]) -> int:
        """Pick one of ``candidates`` (all resident, unpinned, allowed to go) to evict."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_slots={self.num_slots}, num_experts={self.num_experts}, pinned={self.pinned})"
        )


class _LoadOrderPolicy(EvictionPolicy):
    """Shared state of the policies that rank by load order."""

    def _reset_history(self) -> None:
        self._loaded_at: dict[int, int] = {}

    def _on_load(self, expert: int, seq: int) -> None:
        self._loaded_at[expert] = seq

    def _on_evict(self, expert: int) -> None:
        del self._loaded_at[expert]


class LIFOPolicy(_LoadOrderPolicy):
    """The paper's policy: among experts idle in the current batch, evict the last one loaded."""

    name = "lifo"

    def _choose_victim(self, candidates: list[int]) -> int:
        return max(candidates, key=self._loaded_at.__getitem__)


class FIFOPolicy(_LoadOrderPolicy):
    """Among experts idle in the current batch, evict the first one loaded."""

    name = "fifo"

    def _choose_victim(self, candidates: list[int]) -> int:
        return min(candidates, key=self._loaded_at.__getitem__)


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used expert (uses within a step are ordered by routing order)."""

    name = "lru"

    def _reset_history(self) -> None:
        self._last_use: dict[int, int] = {}

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        # A prefetched expert may be resident without a use yet: it ranks as never used.
        return min(candidates, key=lambda e: self._last_use.get(e, -1))


class LFUPolicy(EvictionPolicy):
    """Evict the expert needed in the fewest steps so far; ties go to the least recently used.

    The frequency counts every step since the last :meth:`reset`, including steps during which
    the expert was not resident (the routing history, not the cache history).
    """

    name = "lfu"

    def _reset_history(self) -> None:
        self._freq: dict[int, int] = {}
        self._last_use: dict[int, int] = {}

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        self._freq[expert] = self._freq.get(expert, 0) + 1
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self._freq.get(e, 0), self._last_use.get(e, -1)))


class LFRUPolicy(EvictionPolicy):
    """Decayed routing frequency combined with recency (an LRFU-style score).

    Every step in which an expert is needed adds a weight to its score; scores halve every
    ``half_life`` steps. The victim has the smallest score now (ties: least recently used).

    Args:
        num_slots, num_experts, pinned: as for :class:`EvictionPolicy`.
        half_life: steps after which a use counts half. Small values approach LRU, large ones LFU.
        count_weight: with token counts, a use weighs ``1 + count_weight * share``, where
            ``share`` is the expert's fraction of the step's routed tokens; without counts, 1.
    """

    name = "lfru"
    options = ("half_life", "count_weight")

    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        pinned: Iterable[int] = (),
        *,
        half_life: float = 16.0,
        count_weight: float = 1.0,
    ) -> None:
        if not half_life > 0 or math.isinf(half_life):
            raise ValueError(f"half_life must be a positive finite number, got {half_life}")
        if not count_weight >= 0 or math.isinf(count_weight):
            raise ValueError(f"count_weight must be a finite number >= 0, got {count_weight}")
        self.half_life = float(half_life)
        self.count_weight = float(count_weight)
        self._log_decay = -math.log(2.0) / self.half_life
        super().__init__(num_slots, num_experts, pinned)

    def _reset_history(self) -> None:
        self._score: dict[int, float] = {}  # value at step self._updated[e]
        self._updated: dict[int, int] = {}
        self._last_use: dict[int, int] = {}
        self._step_total = 0

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        self._step_total = sum(counts.values()) if counts is not None else 0

    def score(self, expert: int) -> float:
        """The expert's decayed score at the current step (0 if never used)."""
        if expert not in self._score:
            return 0.0
        age = self._step - self._updated[expert]
        return self._score[expert] * math.exp(self._log_decay * age)

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        weight = 1.0
        if count is not None and self._step_total > 0:
            weight += self.count_weight * count / self._step_total
        self._score[expert] = self.score(expert) + weight
        self._updated[expert] = self._step
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self.score(e), self._last_use.get(e, -1)))

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, half_life={self.half_life}, count_weight={self.count_weight})"


class AdaptiveLFUPolicy(EvictionPolicy):
    """LFU over the current popularity regime: uses are counted since the last detected change.

    The victim is the expert with the fewest uses since the current regime began (ties: least
    recently used): an estimate of each expert's popularity now. Frequencies from before a change in
    the router's popularity only mislead, and a decayed score (``"lfru"``) forgets them no faster in
    a change than in a stable stretch, so this policy detects changes instead:

    * Counting: a step in which an expert is needed adds 1 if the expert was idle in the previous
      step (a new arrival) and ``continuation_weight`` if it was needed there too (mostly the same
      tokens staying on their expert, weaker evidence of popularity than a new arrival).
    * Detection: every ``restart_every`` steps a candidate regime opens; the open candidates began
      about 1, 2, 4, ... ``restart_every`` steps ago, up to ``horizon`` steps (slow streams need
      long windows to gather evidence, quick changes short ones). Each step, the experts newly
      needed (idle in the previous step) are predicted from the counts since the current regime
      began and, for each candidate, from the counts since it opened (add-one-half estimates over
      the experts idle in the previous step). A CUSUM of each candidate's log-likelihood ratio
      accumulates the evidence that popularity changed; when one exceeds ``threshold`` nats (odds
      ``e**threshold`` to one), the current regime restarts where that candidate opened and the
      older counts are forgotten. Without a change the longer history predicts better and the
      statistics stay near zero.
    * Recheck (``recheck`` = 32 steps by default; 0 turns it off): a router whose popularity never
      changes still trips the detector now and then (chance runs of unlikely arrivals, more often
      when experts arrive in correlated groups, as the experts of one token do, since each member
      counts as evidence). For ``recheck`` steps after a detected change, the later arrivals are
      predicted both by the new regime and by the one it replaced, and the replaced regime's
      log-likelihood ratio is summed; the change is a false alarm and the forgotten counts come
      back (:attr:`undone`) as soon as that sum passes ``threshold``, or at the end of the
      ``recheck`` steps if it is positive or if at least ``recheck_overlap`` of the smaller of two
      sets are in both: the (at most ``C``, the unpinned slots) experts used most since the change
      and those the forgotten counts ranked highest. Until then, experts with equal counts in the
      new regime are ranked by their counts in the replaced one, so a false alarm evicts what the
      long history still favours.

    Token counts are not used: a step's counts only describe experts needed in it, and those are
    never evicted while an idle expert can go. Cost per step: O(experts needed in this and the
    previous step) for each open candidate (about ``log2(horizon / restart_every)`` of them, plus
    the replaced regime while a recheck is due), plus a copy of ``num_experts`` counts every
    ``restart_every`` steps.

    Args:
        num_slots, num_experts, pinned: as for :class:`EvictionPolicy`.
        threshold: evidence in nats that restarts the regime; lower reacts sooner to a change and
            restarts more often by chance.
        continuation_weight: weight of a use that continues the expert's use from the previous
            step, in ``[0, 1]`` (1: every step counts alike, as LFU).
        restart_every: steps between candidate regimes.
        horizon: steps a candidate stays open at most (how far back a change can be placed).
        recheck: steps after a detected change during which it may be undone (0: never).
        recheck_overlap: share, in ``(0, 1]``, of the smaller of the two top sets (used most before
            and since the change) that must be in both for the recheck to undo the change.
    """

    name = "adaptive"
    options = ("threshold", "continuation_weight", "restart_every", "horizon", "recheck", "recheck_overlap")
    _PRIOR = 0.5  # pseudo-count of each expert in the likelihood estimates (Krichevsky-Trofimov)

    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        pinned: Iterable[int] = (),
        *,
        threshold: float = 10.0,
        continuation_weight: float = 0.3,
        restart_every: int = 8,
        horizon: int = 256,
        recheck: int = 32,
        recheck_overlap: float = 0.5,
    ) -> None:
        if not threshold > 0 or math.isinf(threshold):
            raise ValueError(f"threshold must be a positive finite number, got {threshold}")
        if not 0.0 <= continuation_weight <= 1.0:
            raise ValueError(f"continuation_weight must be in [0, 1], got {continuation_weight}")
        if not _whole(restart_every) or restart_every < 1:
            raise ValueError(f"restart_every must be a positive integer, got {restart_every}")
        if not _whole(horizon) or horizon < 2 * restart_every:
            raise ValueError(f"horizon must be an integer >= 2 * restart_every ({2 * restart_every}), got {horizon}")
        if not _whole(recheck) or recheck < 0:
            raise ValueError(f"recheck must be a non-negative integer, got {recheck}")
        if not 0.0 < recheck_overlap <= 1.0:
            raise ValueError(f"recheck_overlap must be in (0, 1], got {recheck_overlap}")
        self.recheck = int(recheck)
        self.recheck_overlap = float(recheck_overlap)
        self.threshold = float(threshold)
        self.continuation_weight = float(continuation_weight)
        self.restart_every = int(restart_every)
        self.horizon = int(horizon)
        # A candidate opened at the n-th opening stays open for 2 * 2**v openings, v the number of
        # trailing zero bits of n (at most _max_level): about one open candidate per doubling of age.
        self._max_level = max(0, (self.horizon // (2 * self.restart_every)).bit_length() - 1)
        super().__init__(num_slots, num_experts, pinned)

    def _reset_history(self) -> None:
        self._count = [0.0] * self.num_experts  # weighted uses since reset()
        self._total = 0.0
        self._base: list[float] = self._count.copy()  # _count when the current regime began
        self._base_total = 0.0
        self._regime_start = 0
        self._candidates: list[list] = []  # [_count copy, _total, CUSUM statistic, step, closes at opening]
        self._openings = 0
        self._prev: set[int] = set()  # experts needed in the previous step
        self._last_use: dict[int, int] = {}
        self._changes: list[int] = []
        self._undone: list[int] = []
        # The regime a detected change replaced, while its recheck is due: (base, base_total,
        # regime_start, the new regime's base, step of the recheck).
        self._replaced: tuple | None = None
        self._replaced_llr = 0.0  # evidence for the replaced regime over the new one since the change

    @property
    def regime_start(self) -> int:
        """The step where the counts of the current regime begin (0 until a change is detected)."""
        return self._regime_start

    @property
    def changes(self) -> tuple[int, ...]:
        """Steps at which a change was detected, oldest first (undone ones included)."""
        return tuple(self._changes)

    @property
    def undone(self) -> tuple[int, ...]:
        """Steps at which a recheck found a detected change to be a false alarm and undid it."""
        return tuple(self._undone)

    def score(self, expert: int) -> float:
        """The expert's weighted uses since the current regime began (the eviction key)."""
        return self._count[expert] - self._base[expert]

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        prev = self._prev
        if self._candidates or self._replaced is not None:
            fresh = [e for e in order if e not in prev]
            if fresh:
                self._detect(fresh)
        if self._step % self.restart_every == 0:
            self._openings = n = self._openings + 1
            level = min((n & -n).bit_length() - 1, self._max_level)
            self._candidates = [c for c in self._candidates if c[4] > n]
            self._candidates.append([self._count.copy(), self._total, 0.0, self._step, n + (2 << level)])
        count, weight, added = self._count, self.continuation_weight, 0.0
        for e in order:
            w = weight if e in prev else 1.0
            count[e] += w
            added += w
        self._total += added
        self._prev = set(order)

    def _detect(self, fresh: list[int]) -> None:
        """Add this step's evidence to each candidate's CUSUM and to a due recheck; restart the regime
        past the threshold, or undo the last restart once the replaced regime's evidence passes it."""
        # Runs on every decode step of a cached layer: the log-likelihoods are written out inline
        # (no per-candidate closure, map or list), with the same operations in the same order.
        count, prev, prior, log = self._count, self._prev, self._PRIOR, math.log
        pairs = [(count[e] + prior, e) for e in fresh]
        nf = len(pairs)
        # Every estimate predicts the fresh experts among those idle in the previous step.
        prev_sum = 0
        for e in prev:
            prev_sum += count[e]
        idle_mass = self._total - prev_sum + prior * (self.num_experts - len(prev))

        # The current regime's log-likelihood first, then the replaced one's (recheck due), then each candidate's.
        replaced = self._replaced
        estimates = [(self._base, self._base_total)]
        if replaced is not None:
            estimates.append((replaced[0], replaced[1]))
        estimates += [(cand[0], cand[1]) for cand in self._candidates]
        lls = []
        for since, since_total in estimates:
            s = 0
            for e in prev:
                s += since[e]
            ll = 0
            for c, e in pairs:
                ll += log(c - since[e])
            lls.append(ll - nf * log(max(idle_mass - since_total + s, prior)))
        current = lls[0]
        threshold = self.threshold
        if replaced is not None:
            self._replaced_llr += lls[1] - current
            del lls[1]
            if self._replaced_llr > threshold:
                self._undo()  # the candidates' evidence was against the regime just dropped: no restart now
                return
        best = None
        for cand, ll in zip(self._candidates, lls[1:], strict=True):
            stat = cand[2] + ll - current
            cand[2] = stat = stat if stat > 0.0 else 0.0
            if stat > threshold and (best is None or stat > best[2]):
                best = cand
        if best is not None:
            if self.recheck:  # the forgotten counts are those from the old start to the new one
                self._replaced = (self._base, self._base_total, self._regime_start, best[0], self._step + self.recheck)
                self._replaced_llr = 0.0
            self._base, self._base_total, self._regime_start = best[0], best[1], best[3]
            self._changes.append(self._step)
            self._candidates = []

    def _end_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        replaced = self._replaced
        if replaced is None or self._step < replaced[4]:
            return
        if self._replaced_llr > 0.0:
            self._undo()
            return
        self._replaced = None
        since = self._top_used(self._count, self._base)
        before = self._top_used(replaced[3], replaced[0])
        if since and before and len(since & before) >= self.recheck_overlap * min(len(since), len(before)):
            self._base, self._base_total, self._regime_start = replaced[:3]
            self._undone.append(self._step)

    def _undo(self) -> None:
        """Restore the regime the last detected change replaced (a false alarm)."""
        self._base, self._base_total, self._regime_start = self._replaced[:3]
        self._replaced = None
        self._undone.append(self._step)

    def _top_used(self, count: list[float], base: list[float]) -> set[int]:
        """The (at most ``C`` = unpinned slots) experts with the most uses between ``base`` and ``count``."""
        used = [e for e in range(self.num_experts) if count[e] > base[e]]
        return set(sorted(used, key=lambda e: base[e] - count[e])[: max(1, self.capacity)])

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        count, base, last_use = self._count, self._base, self._last_use
        if self._replaced is None:
            return min(candidates, key=lambda e: (count[e] - base[e], last_use.get(e, -1)))
        old = self._replaced[0]
        return min(candidates, key=lambda e: (count[e] - base[e], count[e] - old[e], last_use.get(e, -1)))

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, threshold={self.threshold}, continuation_weight={self.continuation_weight}, "
            f"restart_every={self.restart_every}, horizon={self.horizon}, recheck={self.recheck}, "
            f"recheck_overlap={self.recheck_overlap})"
        )


class ChangePointPolicy(EvictionPolicy):
    """Evicts the expert least likely to be needed, averaged over when the routing popularity last changed.

    Bayesian online change-point detection (Adams and MacKay, 2007) over the popularity of the
    layer's experts. Each *run* is a hypothesis "the popularity last changed at step s"; under it, an
    expert's probability of being newly needed is its weighted uses since ``s`` plus ``prior``,
    normalised (a Dirichlet-multinomial estimate). Each step:

    * every run is scored by how well it predicted the experts newly needed (idle in the previous
      step: an expert needed again is mostly the same tokens staying, weak evidence of popularity),
      among the experts idle in the previous step, and reweighted by that likelihood raised to
      ``evidence``;
    * every ``open_every`` steps a new run opens (a change since the last opening; it predicts this
      step uniformly) with the chance of such a change, ``1 - (1 - hazard) ** open_every``, of the
      total weight (``hazard``: the chance of a change at any step), and takes the place of the
      lightest run when ``max_runs`` are open. Runs opened a few steps apart give a new run time to
      gather evidence before the next one competes with it: where each step carries little (one
      token per step over few experts), a run opened every step is displaced before it can win;
    * runs with weight below ``1e-8`` of the heaviest are dropped.

    A use counts 1 if the expert was idle in the previous step and ``continuation_weight`` if it was
    needed there too. The victim has the smallest probability under the runs' weighted mixture (ties:
    least recently used). With a fixed popularity the oldest run keeps almost all the weight, which
    is LFU; after a change the runs that begin near it take over within a few steps, and a false
    alarm costs little, since no count is ever forgotten outright. Against ``"adaptive"`` (a hard
    restart after a likelihood-ratio test) this is 0.04-0.27 points of hit rate closer to Belady on
    synthetic traces whose popularity changes, and level on fixed ones and on the measured stack
    routing (docs/expert_buffering.md).

    Cost per step: O(runs x (experts needed in this and the previous step)) to update (plain Python),
    and O(runs) for each candidate ranked in a step that evicts.

    Args:
        num_slots, num_experts, pinned: as for :class:`EvictionPolicy`.
        hazard: prior probability of a popularity change at each step, in ``(0, 1)``.
        prior: pseudo-count of every expert in each run's estimate (> 0): larger values need more
            uses before a new run trusts them.
        continuation_weight: weight of a use that continues the expert's use from the previous step,
            in ``[0, 1]``.
        max_runs: hypotheses kept at most (>= 2).
        open_every: steps between new hypotheses (>= 1).
        evidence: exponent, in ``(0, 1]``, on each step's likelihood: below 1 a step's arrivals count
            as less than independent draws (the experts of one token arrive together, and tokens
            repeat), so chance runs of arrivals move the weights less.
    """

    name = "changepoint"
    options = ("hazard", "prior", "continuation_weight", "max_runs", "evidence", "open_every")
    _DROP = 1e-8  # runs this much lighter than the heaviest are dropped

    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        pinned: Iterable[int] = (),
        *,
        hazard: float = 0.005,
        prior: float = 1.5,
        continuation_weight: float = 0.3,
        max_runs: int = 4,
        evidence: float = 0.7,
        open_every: int = 8,
    ) -> None:
        if not 0.0 < hazard < 1.0:
            raise ValueError(f"hazard must be in (0, 1), got {hazard}")
        if not prior > 0 or math.isinf(prior):
            raise ValueError(f"prior must be a positive finite number, got {prior}")
        if not 0.0 <= continuation_weight <= 1.0:
            raise ValueError(f"continuation_weight must be in [0, 1], got {continuation_weight}")
        if not _whole(max_runs) or max_runs < 2:
            raise ValueError(f"max_runs must be an integer >= 2, got {max_runs}")
        if not 0.0 < evidence <= 1.0:
            raise ValueError(f"evidence must be in (0, 1], got {evidence}")
        if not _whole(open_every) or open_every < 1:
            raise ValueError(f"open_every must be a positive integer, got {open_every}")
        self.open_every = int(open_every)
        self.evidence = float(evidence)
        self.hazard = float(hazard)
        self.prior = float(prior)
        self.continuation_weight = float(continuation_weight)
        self.max_runs = int(max_runs)
        # The common factor 1 - hazard of the continuing runs is left out: the new run gets the odds.
        # A new run stands for a change at any of the open_every steps since the last one opened.
        change = 1.0 - (1.0 - self.hazard) ** self.open_every
        self._odds = change / (1.0 - change)
        super().__init__(num_slots, num_experts, pinned)

    def _reset_history(self) -> None:
        # One entry per run: its first step, each expert's weighted uses since then,
        # their sum, and the run's weight (up to a shared factor: the heaviest is 1 after every step).
        self._zeros = [0.0] * self.num_experts
        self._starts = [0]
        self._uses = [self._zeros.copy()]
        self._totals = [0.0]
        self._weights = [1.0]
        self._prev_uses = [0.0]  # the uses of the previous step's experts
        self._prev_set: set[int] = set()
        self._last_use: dict[int, int] = {}
        self._probability: dict[int, float] = {}

    @property
    def run_starts(self) -> tuple[int, ...]:
        """First step of each live hypothesis, heaviest first."""
        order = sorted(range(len(self._starts)), key=lambda i: -self._weights[i])
        return tuple(self._starts[i] for i in order)

    def probability(self, expert: int) -> float:
        """The expert's probability of being newly needed under the runs' mixture (the eviction key)."""
        p = self._probability.get(expert)
        if p is None:
            prior, n = self.prior, self.prior * self.num_experts
            p = sum(
                w * (uses[expert] + prior) / (total + n)
                for w, uses, total in zip(self._weights, self._uses, self._totals, strict=True)
            ) / sum(self._weights)
            self._probability[expert] = p
        return p

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        # Runs on every decode step of a cached layer, so plain Python over a handful of runs (a few
        # numpy calls per step would cost more than the whole update). The likelihoods are taken in
        # logarithms and the heaviest run is rescaled to weight 1 every step: a prefill brings
        # hundreds of fresh experts among hundreds of idle ones, whose product of probabilities
        # underflows (and the uniform run's inverse overflows) in plain floats.
        prev_set, prior = self._prev_set, self.prior
        uses_all, totals, weights, prev_uses = self._uses, self._totals, self._weights, self._prev_uses
        fresh = [e for e in order if e not in prev_set]
        idle = self.num_experts - len(prev_set)
        temper = self.evidence
        log = math.log
        opening = self._step % self.open_every == 0
        if opening:  # the new run predicts this step's fresh experts uniformly among the idle ones
            log_new = log(sum(weights) * self._odds) - (len(fresh) * temper * log(idle) if fresh else 0.0)
        logs = [log(w) for w in weights]
        if fresh:
            # How well each run predicted the fresh experts among those idle in the previous step.
            for i, uses in enumerate(uses_all):
                mass = totals[i] + prior * idle - prev_uses[i]
                logs[i] += temper * (sum(log(uses[e] + prior) for e in fresh) - len(fresh) * log(mass))
        top = max(max(logs), log_new) if opening else max(logs)
        weights[:] = [math.exp(x - top) for x in logs]
        # Drop runs far lighter than the heaviest; at an opening, open this step's run.
        if min(weights) <= self._DROP:
            keep = [i for i, w in enumerate(weights) if w > self._DROP]
            self._starts = [self._starts[i] for i in keep]
            self._uses = uses_all = [uses_all[i] for i in keep]
            self._totals = totals = [totals[i] for i in keep]
            self._weights = weights = [weights[i] for i in keep]
            self._prev_uses = prev_uses = [prev_uses[i] for i in keep]
        if opening:
            new_weight = math.exp(log_new - top)
            if len(weights) >= self.max_runs:  # the new run takes the lightest one's place
                i = weights.index(min(weights))
                self._starts[i] = self._step
                uses_all[i][:] = self._zeros
                totals[i] = 0.0
                weights[i] = new_weight
                prev_uses[i] = 0.0
            else:
                self._starts.append(self._step)
                uses_all.append(self._zeros.copy())
                totals.append(0.0)
                weights.append(new_weight)
                prev_uses.append(0.0)
        # This step's uses, into every run.
        weight = self.continuation_weight
        step_uses = [(e, weight if e in prev_set else 1.0) for e in order]
        added = sum(w for _, w in step_uses)
        for i, uses in enumerate(uses_all):
            in_step = 0.0  # this step's experts' uses: next step's likelihood leaves them out
            for e, w in step_uses:
                uses[e] = u = uses[e] + w
                in_step += u
            totals[i] += added
            prev_uses[i] = in_step
        self._prev_set = set(order)
        self._probability = {}

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        probability, last_use = self.probability, self._last_use
        return min(candidates, key=lambda e: (probability(e), last_use.get(e, -1)))

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, hazard={self.hazard}, prior={self.prior}, "
            f"continuation_weight={self.continuation_weight}, max_runs={self.max_runs}, evidence={self.evidence}, "
            f"open_every={self.open_every})"
        )


_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (LIFOPolicy, FIFOPolicy, LRUPolicy, LFUPolicy, LFRUPolicy, AdaptiveLFUPolicy, ChangePointPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
"""Names :func:`make_policy` accepts."""
DEFAULT_POLICY = "changepoint"
"""``optimize``'s policy: the closest to Belady on most measured traces, and it recovers when the
routing popularity shifts, where LIFO keeps what it loaded first (docs/expert_buffering.md)."""


def make_policy(
    name: str, num_slots: int, num_experts: int, pinned: Iterable[int] = (), **options: float
) -> EvictionPolicy:
    """Build an online eviction policy by name.

    Args:
        name: one of :data:`POLICY_NAMES` (``"lifo"``, ``"fifo"``, ``"lru"``, ``"lfu"``,
            ``"lfru"``, ``"adaptive"``, ``"changepoint"``), case-insensitive.
        num_slots: GPU slots for the layer, pinned ones included.
        num_experts: experts in the layer.
        pinned: experts never evicted.
        **options: policy-specific settings (``half_life``, ``count_weight`` for ``"lfru"``;
            ``threshold``, ``continuation_weight``, ``restart_every``, ``horizon``, ``recheck``,
            ``recheck_overlap`` for ``"adaptive"``; ``hazard``, ``prior``, ``continuation_weight``,
            ``max_runs``, ``evidence``, ``open_every`` for ``"changepoint"``).

    Raises:
        ValueError: an unknown name, options the policy does not take, or impossible settings
            (see :class:`EvictionPolicy`).
    """
    key = str(name).lower()
    if key not in _POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    cls = _POLICIES[key]
    if options and not cls.options:
        raise ValueError(f"policy {key!r} takes no options, got {sorted(options)}")
    allowed = set(cls.options)
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"policy {key!r} does not take {sorted(unknown)}; it takes {sorted(allowed)}")
    for option, value in options.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"policy option {option}={value!r} must be a number")
    return cls(num_slots, num_experts, pinned, **options)
