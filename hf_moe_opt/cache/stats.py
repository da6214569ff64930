"""The result type shared by the cache simulator and the offline optimum."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheSimResult"]


@dataclass(frozen=True)
class CacheSimResult:
    """Hits and misses of one policy on one layer's trace.

    A needed expert counts once per step: ``hits + misses`` is the sum over steps of the number of
    distinct experts each step needs. The cache starts cold, so every expert's first load is a miss.

    Attributes:
        policy: the policy name (``"belady"`` for the offline optimum).
        num_slots: GPU slots, pinned ones included.
        hits: needed experts found resident.
        misses: needed experts loaded (equal to the number of loads).
        per_step_misses: misses of each step, in trace order.
    """

    policy: str
    num_slots: int
    hits: int
    misses: int
    per_step_misses: tuple[int, ...]

    @property
    def accesses(self) -> int:
        """``hits + misses``."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / accesses``; 0.0 for an empty trace."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def num_steps(self) -> int:
        """Steps in the trace."""
        return len(self.per_step_misses)
