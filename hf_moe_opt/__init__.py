"""hf_moe_opt: fast, memory-lean mixture-of-experts inference for Hugging Face Transformers.

import hf_moe_opt
hf_moe_opt.optimize(model)   # every sparse MoE block -> one dynamic-gating layer
hf_moe_opt.restore(model)    # the original modules back
"""

from ._source_layout import map_source_patches
from .api import (
    is_optimized,
    optimize,
    optimized_layers,
    reset_stats,
    restore,
    stats,
    supported_architectures,
    sync_expert_copies,
)
from .integrations import register_experts_implementation
from .layer import OptimizedMoE
from .placement import PlacementPlan, RoutingTrace, plan_placement, profile
from .support import SupportReport, check_support

__version__ = "0.1.0"

map_source_patches()

__all__ = [
    "OptimizedMoE",
    "PlacementPlan",
    "RoutingTrace",
    "SupportReport",
    "__version__",
    "check_support",
    "is_optimized",
    "optimize",
    "optimized_layers",
    "plan_placement",
    "profile",
    "register_experts_implementation",
    "reset_stats",
    "restore",
    "stats",
    "supported_architectures",
    "sync_expert_copies",
]
