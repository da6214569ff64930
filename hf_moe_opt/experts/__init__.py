"""Expert compute: stacked expert weights and the backends that run them over a dispatch plan."""

from .backends import available_backends, get_backend, resolve_backend
from .weights import ExpertStack, ExpertWeights, FusedExpertTensor

__all__ = ["ExpertStack", "ExpertWeights", "FusedExpertTensor", "available_backends", "get_backend", "resolve_backend"]
