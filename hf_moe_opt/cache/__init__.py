"""Expert buffering: which experts of a MoE layer keep the GPU slots, and the cache that serves them.

``policies`` ranks eviction candidates online (``lifo`` from the paper, ``fifo``, ``lru``, ``lfu``,
``lfru``, ``adaptive``, ``changepoint``), ``belady`` is the offline optimum, ``simulate`` replays
routing traces through them and ``traces`` draws synthetic traces or converts recorded routing.
``store`` is the weight cache behind ``optimize(model, expert_cache=...)`` (``CachedExpertStore``),
``budget`` splits a byte budget into slots, ``offload`` prepares models larger than the GPU.
"""

from .belady import BeladyPolicy, belady
from .budget import CacheBudget, allot_slots, effective_experts, parse_bytes
from .offload import expert_module_names, move_dense, offload_device_map, take_over_offloaded_experts
from .policies import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    AdaptiveLFUPolicy,
    ChangePointPolicy,
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
from .store import CachedExpertStore
from .traces import (
    RoutingTrace,
    TraceLike,
    as_trace,
    synthetic_trace,
    trace_from_assignments,
    trace_from_counts,
)

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "AdaptiveLFUPolicy",
    "BeladyPolicy",
    "CacheBudget",
    "CacheSimResult",
    "CachedExpertStore",
    "ChangePointPolicy",
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
    "allot_slots",
    "as_trace",
    "belady",
    "effective_experts",
    "expert_module_names",
    "hit_rate_curve",
    "make_policy",
    "move_dense",
    "offload_device_map",
    "parse_bytes",
    "simulate",
    "synthetic_trace",
    "take_over_offloaded_experts",
    "trace_from_assignments",
    "trace_from_counts",
]
