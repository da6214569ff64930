"""Load balancing: expert placement across devices planned from measured routing history.

``profile`` records a :class:`RoutingTrace`, ``plan_placement`` turns it into a
:class:`PlacementPlan`, ``device_map_for`` (or ``plan.device_map``) loads a model spread by the plan,
and ``hf_moe_opt.optimize(model, placement=plan)`` / ``optimize(model, expert_parallel=True,
placement=plan)`` run it on several devices or several processes.
"""

from .device_map import device_map_for
from .plan import PlacementPlan, Replica
from .planner import STRATEGIES, plan_placement
from .profile import profile
from .trace import RoutingTrace, routing_statistics, synthetic_zipf_trace

__all__ = [
    "STRATEGIES",
    "PlacementPlan",
    "Replica",
    "RoutingTrace",
    "device_map_for",
    "plan_placement",
    "profile",
    "routing_statistics",
    "synthetic_zipf_trace",
]
