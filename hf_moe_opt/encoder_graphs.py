"""Encoder forwards replayed from CUDA graphs, one per input signature (``cuda_graphs="encoder"``).

An optimized Switch or NLLB-MoE encoder with ``fuse_dense`` does little work per kernel: at 128
sequences of 128 tokens switch-base-128's encoder is 7.5 ms of kernels per forward, and its eager
Python (transformers' layers, hundreds of launches) takes longer than that on a typical host. Here
the encoder module's ``forward`` is wrapped: the first call with a given signature (the shapes,
dtypes and devices of its tensor arguments and the values of the others) runs eagerly once on a side
stream (lazy initialisation, Triton compilation; its result is the call's result) while host reads
are refused, then is captured; later calls copy their tensors into the graph's static buffers,
replay it and get their outputs cloned out of the graph's memory. ``model.generate`` of an
encoder-decoder model calls the same encoder, so its encoder pass is replayed too.

Calls run eagerly (same results, no graph) when autograd is on (``torch.no_grad()`` is needed for a
graph), off CUDA (unless an :class:`~hf_moe_opt.step_graphs.EagerCapture` is set, as the tests do on
a CPU), in training mode, for a signature whose first call read a tensor value on the host (one
warning), and beyond :data:`MAX_GRAPHS` signatures (least recently used graphs are dropped first).
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .host_sync import HostReadError, no_host_reads
from .model_index import ModelIndex
from .step_graphs import (
    Capture,
    CudaGraphCapture,
    _describe,
    _indexed_module,
    _is_opaque,
    _own,
    _pretend_capturing,
    _StepGraph,
    follow_weights,
    forget_pools,
)

# Graphs kept per encoder (each holds its input buffers and activations).
MAX_GRAPHS = 8
_ATTRIBUTE = "_hf_moe_opt_encoder_graphs"


class EncoderGraphs:
    """The graph runner attached to one encoder module (see the module docs).

    ``counts``: ``captures``, ``replays`` and ``eager`` calls (with the reason in ``eager_reasons``).
    """

    def __init__(self, encoder: nn.Module, capture: Capture | None = None):
        self.encoder = encoder
        self.capture: Capture = capture if capture is not None else CudaGraphCapture()
        self.graphs: OrderedDict[tuple, _StepGraph] = OrderedDict()
        self.uncapturable: set[tuple] = set()
        self.warned_off_cuda = False
        self.counts = {"captures": 0, "replays": 0, "eager": 0}
        self.eager_reasons: dict[str, int] = {}
        self._index = ModelIndex(encoder, _indexed_module)
        self._weights_key: tuple | None = None
        # Names of the forward's parameters after self (transformers' wrappers hide them from __code__).
        self._names = list(inspect.signature(type(encoder).forward).parameters)[1:]

    def __getstate__(self) -> dict:
        # A graph replays this encoder's memory (a copy's would compute with the original's weights):
        # a copy (deepcopy, pickle) starts without graphs.
        state = dict(self.__dict__)
        state.update(
            graphs=OrderedDict(),
            uncapturable=set(),
            counts=dict.fromkeys(self.counts, 0),
            eager_reasons={},
            _index=ModelIndex(self.encoder, _indexed_module),
            _weights_key=None,
        )
        return state

    def clear(self) -> None:
        """Drop every graph (their memory is freed once nothing else holds it)."""
        self.graphs.clear()
        self.uncapturable.clear()
        forget_pools(self.capture)

    def _forward(self, **kwargs) -> Any:
        """The encoder's own forward (the module's ``forward`` attribute is this runner)."""
        return type(self.encoder).forward(self.encoder, **kwargs)

    def _eager(self, reason: str, kwargs: dict) -> Any:
        self.counts["eager"] += 1
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1
        return self._forward(**kwargs)

    def __call__(self, *args, **kwargs) -> Any:
        device = next(self.encoder.parameters()).device
        if args:  # positional arguments by name, so that one signature is one set of buffers
            kwargs = {**dict(zip(self._names[: len(args)], args, strict=True)), **kwargs}
        if torch.is_grad_enabled():
            return self._eager("autograd is on (call under torch.no_grad())", kwargs)
        if self.encoder.training:
            return self._eager("training mode", kwargs)
        if not self.capture.supports(device):
            if not self.warned_off_cuda:  # once: the first call tells, the counts keep the rest
                self.warned_off_cuda = True
                warnings.warn(
                    f'cuda_graphs="encoder": the encoder runs on {device.type}; CUDA graphs need a CUDA device, so '
                    "it runs without them",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self._eager("no CUDA graphs here", kwargs)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self._eager("no CUDA graphs here", kwargs)
        follow_weights(self)
        leaves, spec = pytree.tree_flatten(kwargs, is_leaf=_is_opaque)
        key = (spec, tuple(_describe(leaf) for leaf in leaves))
        if key in self.uncapturable:
            return self._eager("capture failed before for these inputs", kwargs)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            self.counts["replays"] += 1
            return _own(graph(leaves), graph.substitutions(leaves), clone=True)

        try:
            # transformers skips its host-reading shortcuts (e.g. "is the padding mask all ones?") while a
            # capture runs; the warm-up takes the same paths, and any host read left is refused.
            with no_host_reads(), _pretend_capturing():
                graph = _StepGraph(self._forward, leaves, spec, self.capture, device)
        except Exception as err:  # a host read (HostReadError) or anything else a capture refuses
            self.uncapturable.add(key)
            why = "reads tensor values on the host" if isinstance(err, HostReadError) else "cannot be captured"
            warnings.warn(
                f'cuda_graphs="encoder": {type(self.encoder).__name__} {why} for these inputs '
                f"({type(err).__name__}: {err}); running them eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return self._eager(f"the forward {why}", kwargs)
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[key] = graph
        self.counts["captures"] += 1
        outputs, graph.first_outputs = graph.first_outputs, None  # an eager result: nothing to clone
        return _own(outputs, graph.substitutions(leaves), clone=False)


def _encoder_of(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    if not isinstance(encoder, nn.Module) or encoder is model:
        raise ValueError(f'cuda_graphs="encoder" needs an encoder-decoder model; {type(model).__name__} has no encoder')
    return encoder


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model`` has no encoder whose forward could be captured."""
    from .step_graphs import _layer_host_read_reason

    encoder = _encoder_of(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "nllb-moe":
        import transformers
        from packaging.version import Version

        from .step_graphs import NLLB_MIN_TRANSFORMERS

        if Version(transformers.__version__) < Version(NLLB_MIN_TRANSFORMERS):
            raise ValueError(
                f'cuda_graphs="encoder": the NLLB-MoE encoder of transformers {transformers.__version__} builds its '
                f"attention mask from host data (measured on an H200 with 5.17: every call ran eagerly); "
                f"transformers >= {NLLB_MIN_TRANSFORMERS} does not"
            )
    device = next(encoder.parameters()).device
    reason = _layer_host_read_reason(encoder, device)
    if reason is not None:
        raise ValueError(f'cuda_graphs="encoder" cannot capture the encoder: {reason}')


def attach(model: nn.Module, capture: Capture | None = None) -> EncoderGraphs:
    """Replay ``model``'s encoder forward from CUDA graphs; returns the runner."""
    check_supported(model)
    encoder = _encoder_of(model)
    runner = EncoderGraphs(encoder, capture)
    encoder.__dict__[_ATTRIBUTE] = runner
    encoder.forward = runner
    return runner


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (no-op when nothing is attached)."""
    try:
        encoder = _encoder_of(model)
    except ValueError:
        return
    runner = encoder.__dict__.pop(_ATTRIBUTE, None)
    if runner is not None:
        runner.clear()
        encoder.__dict__.pop("forward", None)


def runner_of(model: nn.Module) -> EncoderGraphs | None:
    """The :class:`EncoderGraphs` attached to ``model``'s encoder, or None."""
    try:
        return _encoder_of(model).__dict__.get(_ATTRIBUTE)
    except ValueError:
        return None
