"""CUDA-graph replay of a layer's dispatch + experts + combine, per input shape.

A decode step routes a handful of tokens, and the eager layer then spends its time launching some
thirty small kernels. The routed part of the layer has no host synchronisation, so it can be
captured once per shape and replayed: four input copies, one graph launch, one output copy. The
router itself stays eager, so hooks on it (transformers' router-logit recorders) keep firing.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_POOLS: dict[torch.device, object] = {}


def _pool(device: torch.device):
    # One memory pool per device shared by every layer's graphs: they never run concurrently.
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


@contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a CUDA graph is captured. An automatic collection
    inside the capture would run the destructors of unreachable objects, which may free CUDA resources
    (an earlier graph and its pool's memory, pinned buffers): calls a capture does not allow, which
    invalidate it. (``torch.cuda.graph`` itself collects first only under
    ``torch.compiler.config.force_cudagraph_gc``.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphedCompute:
    """``fn(x, expert_index, gates, keep)`` captured for one set of shapes and dtypes."""

    def __init__(self, fn: Callable, x, expert_index, gates, keep):
        self.static = [t.clone() if t is not None else None for t in (x, expert_index, gates, keep)]
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            fn(*self.static)  # warm-up outside the capture: lazy initialisation, backend probes
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with collection_paused(), torch.cuda.graph(self.graph, pool=_pool(x.device)):
            self.out = fn(*self.static)

    def __call__(self, x, expert_index, gates, keep) -> torch.Tensor:
        for dst, src in zip(self.static, (x, expert_index, gates, keep), strict=True):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.out.clone()


class GraphCache:
    """Graphs of one layer keyed by shapes; at most ``max_graphs`` of them, then eager."""

    def __init__(self, max_rows: int = 1024, max_graphs: int = 16):
        self.max_rows = max_rows
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, GraphedCompute] = {}
        self.warned_off_cuda = False

    def __getstate__(self) -> dict:
        # The graphs replay the original layer's weights and buffers: a copy captures its own.
        return {**self.__dict__, "graphs": {}}

    def clear(self) -> None:
        if self.graphs:
            # Later captures take a fresh pool: PyTorch refuses one whose graphs are all gone while
            # memory made during their capture is still held (see CudaGraphCapture.forget_pools).
            _POOLS.clear()
        self.graphs.clear()

    def run(self, fn: Callable, x, expert_index, gates, keep) -> torch.Tensor:
        rows = expert_index.numel()
        if not x.is_cuda and not self.warned_off_cuda:
            self.warned_off_cuda = True
            warnings.warn(
                f"cuda_graphs=True: this layer runs on {x.device.type}; CUDA graphs need a CUDA device, so it runs "
                "without them",
                RuntimeWarning,
                stacklevel=3,
            )
        if not x.is_cuda or rows > self.max_rows or torch.cuda.is_current_stream_capturing():
            return fn(x, expert_index, gates, keep)
        key = (x.device, x.shape, x.dtype, expert_index.shape, gates.dtype, keep is None)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return fn(x, expert_index, gates, keep)
            graphed = self.graphs[key] = GraphedCompute(fn, x, expert_index, gates, keep)
        return graphed(x, expert_index, gates, keep)
