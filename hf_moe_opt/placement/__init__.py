"""Load balancing: expert placement across devices planned from measured routing history."""

from .plan import PlacementPlan, Replica
from .planner import STRATEGIES, plan_placement
from .trace import RoutingTrace, routing_statistics, synthetic_zipf_trace

__all__ = [
    "STRATEGIES",
    "PlacementPlan",
    "Replica",
    "RoutingTrace",
    "plan_placement",
    "routing_statistics",
    "synthetic_zipf_trace",
]
