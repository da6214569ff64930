"""Integrations with transformers' own extension points."""

from .continuous_batching import continuous_batching_available, continuous_batching_config, uncapturable_layers
from .experts_interface import (
    EXPERTS_IMPLEMENTATION,
    experts_forward,
    is_experts_implementation_registered,
    register_experts_implementation,
)

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "continuous_batching_available",
    "continuous_batching_config",
    "experts_forward",
    "is_experts_implementation_registered",
    "register_experts_implementation",
    "uncapturable_layers",
]
