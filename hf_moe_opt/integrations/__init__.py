"""Integrations with transformers' own extension points."""

from .experts_interface import (
    EXPERTS_IMPLEMENTATION,
    experts_forward,
    is_experts_implementation_registered,
    register_experts_implementation,
)

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "experts_forward",
    "is_experts_implementation_registered",
    "register_experts_implementation",
]
