"""Optimized MoE layers under transformers' continuous batching (``generate_batch``).

Continuous batching packs the scheduled tokens of many requests (prefill chunks and decode steps
together) into one flat batch ``[1, T, D]`` with paged attention, and runs the model in a background
thread. The optimized layers route every token on its own and the decoder families have no
capacity, so packing changes no token's output: ``optimize(model)`` and
``experts_implementation="hf_moe_opt"`` work unchanged. Two things need care, and
:func:`continuous_batching_config` handles both:

* the config's page-size field is ``block_size`` up to transformers 5.17 and ``page_size`` later;
* on CUDA, continuous batching captures whole steps in CUDA graphs (by default when the attention
  needs no mask, e.g. flash attention). A layer whose expert store reads the routing on the host
  (``expert_cache=``, ``placement=``) cannot be captured, so the config turns those graphs off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..layer import OptimizedMoE


def continuous_batching_available() -> bool:
    """Whether the installed transformers offers ``model.generate_batch`` and ``ContinuousBatchingConfig``."""
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        return False
    return hasattr(GenerationMixin, "generate_batch")


def uncapturable_layers(model: nn.Module) -> list[str]:
    """Names of the optimized layers of ``model`` that cannot run inside a CUDA-graph capture of
    continuous batching: stores that read the routing on the host, and read-behind expert caches
    (``cache_misses="read"``), whose policy runs after each replay of ``cuda_graphs="step"`` only."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, OptimizedMoE) and (not m.store.capturable or getattr(m.store, "read_behind", None) is not None)
    ]


def continuous_batching_config(model: nn.Module | None = None, **options: Any):
    """A ``transformers.ContinuousBatchingConfig`` for ``model``, with the same options on every version.

    Args:
        model: the (optimized) model; when any of its layers cannot be captured in a CUDA graph
            (:func:`uncapturable_layers`), ``use_cuda_graph`` defaults to False.
        **options: fields of ``ContinuousBatchingConfig``. ``page_size`` and ``block_size`` are the
            same option (the installed version's name is used).

    Raises:
        RuntimeError: the installed transformers has no continuous batching.
        ValueError: ``use_cuda_graph`` requested for a model with uncapturable layers.
        TypeError: an option the installed ``ContinuousBatchingConfig`` does not have.
    """
    if not continuous_batching_available():
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no continuous batching (generate_batch)")
    from transformers import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    # 5.17 names the page size block_size; later versions page_size (block_size kept, deprecated).
    size_name = "page_size" if "page_size" in fields else "block_size"
    for alias in {"page_size", "block_size"} - {size_name}:
        if alias in options:
            if size_name in options:
                raise TypeError("pass one of page_size and block_size")
            options[size_name] = options.pop(alias)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"ContinuousBatchingConfig has no option {', '.join(unknown)}")
    blocked = uncapturable_layers(model) if model is not None else []
    if blocked:
        requested = options.get("use_cuda_graph")
        if requested is True or (isinstance(requested, tuple) and any(requested)):
            raise ValueError(
                f"use_cuda_graph={requested!r}: layers {', '.join(blocked[:3])}{'...' if len(blocked) > 3 else ''} "
                "read the routing on the host (expert_cache=/placement=) or serve misses from host memory "
                '(cache_misses="read", graphed by cuda_graphs="step" only) and cannot be captured in a CUDA graph'
            )
        options["use_cuda_graph"] = False
    return ContinuousBatchingConfig(**options)
