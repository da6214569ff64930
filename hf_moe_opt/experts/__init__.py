"""Expert compute: stacked expert weights and the backends that run them over a dispatch plan."""

from .backends import available_backends, get_backend, resolve_backend
from .weights import ExpertStack, ExpertWeights

__all__ = ["ExpertStack", "ExpertWeights", "available_backends", "get_backend", "resolve_backend"]
