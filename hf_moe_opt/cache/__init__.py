"""Expert buffering: which experts of a MoE layer keep the GPU slots (pure bookkeeping, no weights).

``policies`` ranks eviction candidates online (``lifo`` from the paper, ``fifo``, ``lru``, ``lfu``,
``lfru``), ``belady`` is the offline optimum, ``simulate`` replays routing traces through them and
``traces`` draws synthetic traces or converts recorded routing.
"""

from .belady import BeladyPolicy, belady
from .policies import (
    POLICY_NAMES,
    EvictionPolicy,
    FIFOPolicy,
    LFRUPolicy,
    LFUPolicy,
    LIFOPolicy,
    Load,
    LRUPolicy,
    StepOutcome,
    make_policy,
)
from .simulate import hit_rate_curve, simulate
from .stats import CacheSimResult
from .traces import (
    RoutingTrace,
    TraceLike,
    as_trace,
    synthetic_trace,
    trace_from_assignments,
    trace_from_counts,
)

__all__ = [
    "POLICY_NAMES",
    "BeladyPolicy",
    "CacheSimResult",
    "EvictionPolicy",
    "FIFOPolicy",
    "LFRUPolicy",
    "LFUPolicy",
    "LIFOPolicy",
    "LRUPolicy",
    "Load",
    "RoutingTrace",
    "StepOutcome",
    "TraceLike",
    "as_trace",
    "belady",
    "hit_rate_curve",
    "make_policy",
    "simulate",
    "synthetic_trace",
    "trace_from_assignments",
    "trace_from_counts",
]
