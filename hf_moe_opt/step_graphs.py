"""Whole-step CUDA graphs for ``generate``: every decode step of the model replayed as one graph.

``optimize(model, cuda_graphs="step")`` routes ``model.generate`` through :class:`StepGraphs`. Per-layer
graphs (``cuda_graphs=True``) leave the attention, norms, embeddings and LM head of a decode step
launch-bound; here the whole forward of a one-token step (every layer, attention over the KV cache,
the MoE layers, the LM head) is captured once per input signature and replayed.

How a ``generate`` call runs:

* ``generate`` gets a static KV cache owned by the runner: ``StaticCache`` (encoder-decoder models:
  ``EncoderDecoderCache(StaticCache, StaticCache)``, the cross-attention one as long as the encoder
  output). One cache per (batch, cache length rounded up to :data:`LENGTH_BUCKET`, encoder length,
  dtype, device), reset and reused by later calls, so a graph's memory addresses stay valid.
* While ``generate`` runs, ``model.forward`` is wrapped. A causal model's first forward (the prefill)
  runs eagerly, as does any forward of more than one token. An encoder-decoder's first decoder step
  (one token, which also fills the cross-attention cache) is captured under a graph of its own: the
  cache's ``is_updated`` flags are part of a step's signature, and a replay sets them as the captured
  step did. A one-token step copies its tensor inputs
  (token ids, position ids, the attention mask over the whole static cache, encoder states and mask)
  into static buffers and replays the graph of its signature (input shapes, dtypes, the other
  arguments); the logits are cloned out of the graph's memory.
* The first step of a signature runs eagerly on a side stream (lazy initialisation, Triton
  compilation; its result is that step's result), then the step is captured. transformers'
  ``StaticLayer`` keeps its fill level in a device tensor, so the position advances inside the graph.
* Beam search reorders the cache between steps; the runner makes that reordering copy the chosen
  rows back into the same cache tensors (transformers would bind new ones, which the graphs never see).

What cannot be captured raises or falls back (with a warning) instead of replaying something wrong;
see :func:`check_supported` and :meth:`StepGraphs.fallback_reason`.

The capture is pluggable (:class:`CudaGraphCapture`, :class:`EagerCapture`): on a CPU the eager
stand-in runs the same static-buffer path, makes transformers take the code paths it takes under
capture, and raises on any host read (:mod:`hf_moe_opt.host_sync`), so tests can check a model's
decode step without a GPU.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import nn

from .cache.host_reads import STEP_MAX_TOKENS, captured_calls
from .graphs import collection_paused
from .host_sync import no_host_reads
from .layer import OptimizedMoE, refresh_router_cast_of
from .model_index import ModelIndex

# Static caches are sized up to a multiple of this many positions, so calls with nearby lengths share
# one cache and one graph; the extra positions are masked (and cost a little attention bandwidth).
LENGTH_BUCKET = 64
# Caches (with their graphs) kept per model, least recently used dropped first.
MAX_SLOTS = 4
# Graphs per cache; a step whose signature would need more runs eagerly.
MAX_GRAPHS_PER_SLOT = 4
# Encoder-decoders whose decoder turns the encoder's padding mask into an additive (eager) mask at every
# step: the runner passes that 4-D mask in, built outside the graph (see _Slot.cross_mask).
ADDITIVE_CROSS_MASK_MODELS = ("switch_transformers",)

_ATTRIBUTE = "_hf_moe_opt_step_graphs"


class Capture(Protocol):
    """How a step is warmed up and captured: a CUDA graph, or an eager stand-in."""

    def supports(self, device: torch.device) -> bool: ...

    def warm_up(self, fn: Callable[[], Any], device: torch.device) -> Any:
        """Run ``fn`` once for real (lazy initialisation) and return its result."""

    def capture(self, fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
        """Record ``fn``; the returned callable replays it on the same buffers and returns its outputs."""

    def forget_pools(self) -> None:
        """Every graph was dropped: later captures take fresh memory pools."""


class CudaGraphCapture:
    """Steps captured in CUDA graphs; the graphs of one runner share a memory pool (never run concurrently)."""

    def __init__(self) -> None:
        self._pools: dict[torch.device, Any] = {}

    def __getstate__(self) -> dict:
        return {"_pools": {}}  # a copy's graphs get pools of their own (a handle means nothing elsewhere)

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def warm_up(self, fn: Callable[[], Any], device: torch.device) -> Any:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def forget_pools(self) -> None:
        # PyTorch refuses a capture into a pool whose graphs are all gone while some of its memory is
        # still held (outputs handed out, buffers made during a capture): never reuse such a pool.
        self._pools.clear()

    def capture(self, fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with collection_paused(), torch.cuda.graph(graph, pool=self._pools[device]):
            out = fn()

        def replay() -> Any:  # holds the graph (and its memory) for as long as the step is kept
            graph.replay()
            return out

        return replay


@contextmanager
def _pretend_capturing() -> Iterator[None]:
    # transformers (is_tracing) and hf_moe_opt (GraphCache) pick capture-safe code paths by asking this.
    original = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = original


class EagerCapture:
    """Stand-in for :class:`CudaGraphCapture` on any device (tests, debugging on a CPU).

    ``capture`` records the step without running it, as a CUDA capture does; each replay runs it
    eagerly on the same static buffers while ``torch.cuda.is_current_stream_capturing()`` reports True
    (so transformers takes its capture code paths) and, with ``check_host_reads``, raises
    :class:`~hf_moe_opt.host_sync.HostReadError` on any host read of a tensor value. Unlike a real
    graph, Python runs again on every replay: state kept in Python between steps is not frozen here,
    which is why :func:`check_supported` rejects the cache layers known to keep such state.
    """

    def __init__(self, check_host_reads: bool = True) -> None:
        self.check_host_reads = check_host_reads

    def supports(self, device: torch.device) -> bool:
        return True

    def warm_up(self, fn: Callable[[], Any], device: torch.device) -> Any:
        return fn()

    def forget_pools(self) -> None:
        pass

    def capture(self, fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
        def replay() -> Any:
            with _pretend_capturing(), no_host_reads() if self.check_host_reads else nullcontext():
                return fn()

        return replay


def _cache_classes():
    from transformers.cache_utils import Cache, EncoderDecoderCache, StaticCache, StaticLayer

    return Cache, EncoderDecoderCache, StaticCache, StaticLayer


def _is_opaque(x: Any) -> bool:
    # A cache is state the graph reads and writes in place, never an input to copy.
    return isinstance(x, _cache_classes()[0])


def _describe(leaf: Any) -> Any:
    """The part of a graph's key one argument contributes."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return leaf
    return ("object", id(leaf))


def _decoder_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# The oldest transformers whose NLLB-MoE decode step reads nothing on the host (checked on a CPU with
# EagerCapture; 5.17 builds its eager cross-attention mask from Python data every step).
NLLB_MIN_TRANSFORMERS = "5.24"


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model``'s decode steps cannot be captured whole (checked by ``optimize``)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise ValueError('cuda_graphs="step" needs a transformers model with generate()')
    if config.model_type == "nllb-moe":
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version(NLLB_MIN_TRANSFORMERS):
            raise ValueError(
                f"NLLB-MoE decode steps cannot be captured whole with transformers {transformers.__version__}: "
                "its eager attention builds the cross-attention mask from Python data at every step (a "
                f"host-to-device copy). transformers >= {NLLB_MIN_TRANSFORMERS} does not; with this version use "
                "cuda_graphs=True (per-layer graphs)."
            )
    for name, module in model.named_modules():
        why = _HOST_READING_MODULES.get(type(module).__name__)
        if why is not None:
            raise ValueError(
                f'cuda_graphs="step" cannot capture {type(model).__name__}: {name} ({type(module).__name__}) {why}. '
                "Use cuda_graphs=True (per-layer graphs)."
            )
    _, _, StaticCache, StaticLayer = _cache_classes()
    try:
        probe = StaticCache(config=_decoder_config(model), max_cache_len=LENGTH_BUCKET)
    except Exception as e:  # whatever the reason, this model gets no static cache
        raise ValueError(f'cuda_graphs="step": {type(model).__name__} has no static KV cache ({e})') from e
    other = sorted({type(layer).__name__ for layer in probe.layers if type(layer) is not StaticLayer})
    if other:
        reasons = sorted({reason for name in other for reason in _cache_layer_reasons(name)})
        raise ValueError(
            f'cuda_graphs="step" cannot capture {type(model).__name__}: its static cache uses {", ".join(other)} '
            f"({'; '.join(reasons)}), so a replayed step would take a stale branch. Use cuda_graphs=True "
            "(per-layer graphs)."
        )


# Modules that stay transformers' own after optimize and read tensor values on the host in every
# forward (a decode step holding one cannot be captured), by class name, and why.
_HOST_READING_MODULES = {
    "JetMoeMoA": "is JetMoE's mixture of attention experts, whose gating reads its group sizes on the host",
}


# Parts of static-cache layer class names, and why the step runner cannot replay such a layer.
_CACHE_LAYER_REASONS = (
    ("Sliding", "sliding-window or chunked attention tracks its fill level in Python"),
    ("LinearAttention", "linear-attention, Mamba or convolution state is tracked in Python"),
    ("Indexed", "a sparse-attention indexer cache tracks its fill level in Python"),
    ("Dummy", "placeholder layers for blocks without attention are not static layers the runner resets"),
)


def _cache_layer_reasons(name: str) -> list[str]:
    """Why a static-cache layer class named ``name`` keeps a decode step from being captured whole."""
    found = [reason for part, reason in _CACHE_LAYER_REASONS if part in name]
    return found or ["a cache layer the step runner does not know"]


def _layer_host_read_reason(
    model: nn.Module, device: torch.device, layers: list[tuple[str, nn.Module]] | None = None
) -> str | None:
    """Why an optimized layer cannot run inside a captured step: its store or expert loop reads the host,
    or routing observers (the profiler) want every step's routing, which a replay does not call them with.
    ``layers``: ``model``'s ``(name, module)`` pairs to look at (default: all of them)."""
    from .experts.backends import resolve_backend
    from .experts.store import ResidentStore
    from .experts.torch_backend import _layout_supported
    from .layer import OptimizedMoE

    for name, layer in model.named_modules() if layers is None else layers:
        if not isinstance(layer, OptimizedMoE):
            continue
        if layer.observers:
            return f"{name} has routing observers (hf_moe_opt.profile), which must see every step"
        if not getattr(layer.store, "capturable", isinstance(layer.store, ResidentStore)):
            return f"{name}'s expert store ({type(layer.store).__name__}) reads the routing on the host"
        if device.type == "cuda" and resolve_backend(layer.backend, device) == "torch":
            w1, _, w2, _ = layer.weights.tensors()
            if not (_layout_supported(device, w1) and _layout_supported(device, w2)):
                return (
                    f"{name} runs backend='torch' with {w1.dtype} experts, where torch._grouped_mm is not "
                    "available and the expert loop reads group sizes on the host; use backend='triton' or 'auto'"
                )
    return None


class _StepGraph:
    """One captured decode step: static input buffers and the replay.

    ``state``: ``(get, put)`` of Python state the forward changes (an encoder-decoder cache's
    ``is_updated`` flags, set by the first decoder step once it has filled the cross-attention cache).
    The capture runs from the state the warm-up started from, and every replay leaves the state the
    warm-up left, since a replay runs no Python.
    """

    def __init__(
        self,
        forward: Callable,
        leaves: list,
        spec,
        capture: Capture,
        device: torch.device,
        state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    ):
        self.positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        static = list(leaves)
        for i in self.positions:
            static[i] = leaves[i].clone()
        self.buffers = [static[i] for i in self.positions]
        static_kwargs = pytree.tree_unflatten(static, spec)

        def step() -> Any:
            return forward(**static_kwargs)

        self._put = state[1] if state is not None else None
        before = state[0]() if state is not None else None
        self.read_calls: list = []  # (read-behind cache, tokens) of each call the capture saw, in order
        self.first_outputs = capture.warm_up(step, device)  # the real result of this first step
        self.after = state[0]() if state is not None else None
        if state is not None:
            self._put(before)
        self.replay = capture.capture(step, device)
        if state is not None:
            self._put(self.after)

    def substitutions(self, leaves: list) -> dict[int, torch.Tensor]:
        """Outputs that are input buffers (an encoder-decoder passes its encoder states through) map back
        to the caller's tensors."""
        return {id(buf): leaves[i] for buf, i in zip(self.buffers, self.positions, strict=True)}

    def __call__(self, leaves: list) -> Any:
        for buf, i in zip(self.buffers, self.positions, strict=True):
            buf.copy_(leaves[i])
        out = self.replay()
        if self._put is not None:
            self._put(self.after)
        return out


def _own(outputs: Any, substitutions: dict[int, torch.Tensor], clone: bool) -> Any:
    """``outputs`` with input buffers replaced by the caller's tensors and, after a replay, every other
    tensor cloned out of the graph's memory (the next replay overwrites it)."""
    leaves, spec = pytree.tree_flatten(outputs, is_leaf=_is_opaque)
    owned = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in substitutions:
                leaf = substitutions[id(leaf)]
            elif clone:
                leaf = leaf.clone()
        owned.append(leaf)
    return pytree.tree_unflatten(owned, spec)


class _Slot:
    """A static cache and the graphs of the steps that run on it."""

    def __init__(self, cache, length: int = 0) -> None:
        self.cache = cache
        self.length = length  # the cache's capacity in positions
        self.graphs: OrderedDict[tuple, _StepGraph] = OrderedDict()
        self.prefilled = False
        self.over_limit = False  # warned that more step signatures than MAX_GRAPHS_PER_SLOT came
        self._cross_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # (padding mask, its 4-D form)

    def cross_mask(self, padding: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """The decoder's cross-attention mask, built outside the graph: ``[B, 1, 1, S]``, 0 where the
        encoder token counts and the dtype's minimum where it is padding -- the values transformers'
        eager mask builder makes from the ``[B, S]`` padding mask. Some transformers versions (5.17)
        make it through a host-to-device copy, which a graph cannot capture; a 4-D mask is used as
        given. The padding mask is the same tensor at every step of a call: built once per call (the
        runner forgets it when a call starts)."""
        if padding.dim() != 2:
            return padding
        if self._cross_masks is None or self._cross_masks[0] is not padding:
            dtype = model.get_input_embeddings().weight.dtype
            keep = padding[:, None, None, :].bool()
            additive = torch.zeros(keep.shape, dtype=dtype, device=padding.device).masked_fill_(
                ~keep, torch.finfo(dtype).min
            )
            self._cross_masks = (padding, additive)
        return self._cross_masks[1]


class StepGraphs:
    """Runs ``generate`` with every one-token decode step replayed from a CUDA graph.

    Attached by ``optimize(model, cuda_graphs="step")``, which makes :meth:`generate` the model's
    ``generate``; ``hf_moe_opt.restore`` detaches it::

        hf_moe_opt.optimize(model, cuda_graphs="step")
        out = model.generate(**batch, max_new_tokens=64)      # the first call per batch size captures
        hf_moe_opt.step_graphs.runner_of(model).counts          # captures, replays, eager, fallbacks

    ``counts`` records ``captures``, ``replays``, ``eager`` forwards (causal prefills) and ``fallbacks``
    (calls run by plain ``generate``). A cache ``generate`` returns (``return_dict_in_generate``) is
    the runner's and is reset by the next call of the same shape. Python code inside the model
    (forward hooks, routing observers) runs while a step is captured, not when it is replayed. To check
    a model's decode step on a CPU: ``runner_of(model).capture = EagerCapture()``, then ``generate``.

    Args:
        model: the transformers model.
        capture: :class:`CudaGraphCapture` (default) or :class:`EagerCapture`.
    """

    def __init__(self, model: nn.Module, capture: Capture | None = None):
        self.model = model
        self.capture: Capture = capture if capture is not None else CudaGraphCapture()
        self.slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self.counts = {"captures": 0, "replays": 0, "eager": 0, "fallbacks": 0}
        self.broken: str | None = None  # set when a capture failed: later calls fall back
        self._weights_key: tuple | None = None
        # The modules a call looks at, walked once (a large model's walk costs more than short decodes).
        self._index = ModelIndex(model, _indexed_module)
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 names the forward's cache argument "cache", 5.17 "past_key_values".
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def __getstate__(self) -> dict:
        # Graphs and caches belong to this model's memory: a copy (deepcopy, pickle) starts without any.
        state = dict(self.__dict__)
        state.update(
            slots=OrderedDict(),
            counts=dict.fromkeys(self.counts, 0),
            broken=None,
            _weights_key=None,
            _index=ModelIndex(self.model, _indexed_module),
        )
        return state

    def clear(self) -> None:
        """Drop every cache and graph (their memory is freed once nothing else holds it)."""
        self.slots.clear()
        self._weights_key = None
        forget_pools(self.capture)

    # -- generate -------------------------------------------------------------------------------

    def generate(self, *args, **kwargs):
        """``model.generate(*args, **kwargs)`` with decode steps replayed from CUDA graphs (greedy,
        sampling or beam search). Calls the runner cannot serve run plain ``generate`` with a warning."""
        args, kwargs = self._by_name(args, kwargs)
        plan = self._plan(args, kwargs)
        if isinstance(plan, str):
            warnings.warn(f'cuda_graphs="step": {plan}; running plain generate', stacklevel=2)
            self.counts["fallbacks"] += 1
            return self._plain_generate(*args, **kwargs)
        slot = self._slot(*plan[:5])
        slot.cache.reset()
        slot.prefilled = False
        slot._cross_masks = None  # built again from this call's padding mask (it may be edited in place)
        kwargs = dict(kwargs)
        # The cache is passed in (a configured cache_implementation would conflict), and transformers would
        # torch.compile the step of a static-cache generate.
        overrides = {"cache_implementation": None, "disable_compile": True}
        if kwargs.get("generation_config") is not None:
            kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
            for name, value in overrides.items():
                setattr(kwargs["generation_config"], name, value)
        else:
            kwargs.update(overrides)
        if plan[5] is not None and kwargs.get("decoder_attention_mask") is None:
            # Without a decoder mask transformers 5.17's T5-style stacks build one as long as the cache's
            # (device) length, read on the host; given one, generate extends it and makes it 4-D instead.
            kwargs["decoder_attention_mask"] = torch.ones(plan[5], dtype=torch.long, device=plan[4])
        kwargs[self._cache_kw] = slot.cache
        with self._forward_through(slot), _in_place_reorder(slot.cache):
            return self._plain_generate(*args, **kwargs)

    def _by_name(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Positional arguments after the inputs by name (``generate(ids, generation_config)``): the plan
        reads the generation config and the options from the keywords."""
        if len(args) <= 1:
            return args, kwargs
        names = list(inspect.signature(type(self.model).generate).parameters)[2:]  # after self, inputs
        named = dict(zip(names, args[1:], strict=False))
        if len(args) - 1 > len(names) or named.keys() & kwargs.keys():
            return args, kwargs  # generate itself reports the mistake
        return args[:1], {**named, **kwargs}

    def _plain_generate(self, *args, **kwargs):
        return type(self.model).generate(self.model, *args, **kwargs)

    def fallback_reason(self, args: tuple = (), kwargs: dict | None = None) -> str | None:
        """Why ``generate(*args, **kwargs)`` would run without step graphs, or None."""
        plan = self._plan(*self._by_name(args, kwargs or {}))
        return plan if isinstance(plan, str) else None

    def _plan(self, args: tuple, kwargs: dict) -> tuple | str:
        """``(batch, cache length, encoder length, dtype, device, decoder prompt shape or None)`` for this
        call, or why it runs plain ``generate``."""
        model = self.model
        if self.broken is not None:
            return self.broken
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        if not self.capture.supports(device):
            return f"the model is on {device}, step graphs need CUDA"
        reason = _layer_host_read_reason(model, device, self._index.modules())
        if reason is not None:
            return reason
        config = kwargs.get("generation_config") or model.generation_config

        def option(name: str, default=None):
            value = kwargs.get(name, getattr(config, name, None))
            return default if value is None else value

        for name in ("assistant_model", "prefill_chunk_size", "custom_generate"):
            if option(name) is not None:
                return f"{name}= is not supported"
        if kwargs.get("synced_gpus"):
            return "synced_gpus= is not supported"
        if option("use_cache", True) is False:
            return "use_cache=False has no cache to capture"
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return "a cache passed in is used as it is"
        if option("cache_implementation") not in (None, "static"):
            return f"cache_implementation={option('cache_implementation')!r} is not a static cache"
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        encoder_length = None
        if encoder_decoder:
            encoder_outputs = kwargs.get("encoder_outputs")
            if encoder_outputs is not None:
                encoder_length, batch = encoder_outputs[0].shape[1], encoder_outputs[0].shape[0]
            elif isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
                encoder_length, batch = inputs.shape[1], inputs.shape[0]
            else:
                return "pass input_ids (or encoder_outputs)"
            decoder_ids = kwargs.get("decoder_input_ids")
            prompt = decoder_ids.shape[-1] if isinstance(decoder_ids, torch.Tensor) else 1
            decoder_prompt = (batch, prompt)
        else:
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or kwargs.get("inputs_embeds") is not None:
                return "pass input_ids (inputs_embeds are not supported)"
            batch, prompt = inputs.shape
            decoder_prompt = None
        max_new = option("max_new_tokens")
        total = prompt + max_new if max_new is not None else option("max_length", 20)
        length = LENGTH_BUCKET * math.ceil((total + 1) / LENGTH_BUCKET)
        # generate repeats every sequence once per beam (beam search) or per returned sequence (sampling).
        beams = option("num_beams", 1)
        expand = beams if beams > 1 else option("num_return_sequences", 1)
        if self._read_behind():
            if batch * expand > STEP_MAX_TOKENS:
                return (
                    f'an expert cache (cache_misses="read") runs inside step graphs for at most {STEP_MAX_TOKENS} '
                    f"sequences per step, this call decodes {batch * expand}"
                )
            if any(getattr(m, "backend", None) == "torch" for _, m in self._index.modules()):
                return 'an expert cache (cache_misses="read") runs inside step graphs on the Triton backend only'
        return batch * expand, length, encoder_length, dtype, device, decoder_prompt

    def _read_behind(self) -> list:
        """The read-behind expert caches of the model's layers (their policies run after each replay)."""
        reads = (getattr(getattr(m, "store", None), "read_behind", None) for _, m in self._index.modules())
        return [r for r in reads if r is not None]

    def _slot(self, batch: int, length: int, encoder_length: int | None, dtype, device) -> _Slot:
        follow_weights(self)
        key = (batch, length, encoder_length, dtype, device)
        slot = self.slots.get(key)
        if slot is None:
            while len(self.slots) >= MAX_SLOTS:
                self.slots.popitem(last=False)
            _, EncoderDecoderCache, StaticCache, _ = _cache_classes()
            config = _decoder_config(self.model)
            cache = StaticCache(config=config, max_cache_len=length)
            if encoder_length is not None:
                cache = EncoderDecoderCache(cache, StaticCache(config=config, max_cache_len=encoder_length))
            slot = self.slots[key] = _Slot(cache, length)
        self.slots.move_to_end(key)
        return slot

    # -- the forward --------------------------------------------------------------------------

    @contextmanager
    def _forward_through(self, slot: _Slot) -> Iterator[None]:
        model = self.model
        had_own = "forward" in model.__dict__  # e.g. accelerate hooks wrap forward per instance
        saved = model.__dict__.get("forward")
        forward = model.forward
        ids_name = "decoder_input_ids" if getattr(model.config, "is_encoder_decoder", False) else "input_ids"

        # An encoder-decoder's first decoder step is one token too: it also fills the cross-attention
        # cache, under its own graph (the cache's is_updated flags are part of a step's signature).
        first_step_graphed = ids_name == "decoder_input_ids"
        additive_padding = getattr(model.config, "model_type", None) in ADDITIVE_CROSS_MASK_MODELS

        @functools.wraps(forward)  # generate inspects the forward's signature
        def step_forward(*args, **kwargs):
            ids = kwargs.get(ids_name)
            decode = (
                not args
                and (slot.prefilled or first_step_graphed)
                and isinstance(ids, torch.Tensor)
                and ids.shape[-1] == 1
                and kwargs.get(self._cache_kw) is slot.cache
            )
            slot.prefilled = True
            if not decode:
                self.counts["eager"] += 1
                return forward(*args, **kwargs)
            if additive_padding and isinstance(kwargs.get("attention_mask"), torch.Tensor):
                kwargs["attention_mask"] = slot.cross_mask(kwargs["attention_mask"], model)
            return self._step(slot, forward, kwargs)

        model.forward = step_forward
        try:
            with _capturable_positions(model, slot.length, [m for _, m in self._index.modules()]):
                yield
        finally:
            if had_own:
                model.forward = saved
            else:
                del model.forward

    def _step(self, slot: _Slot, forward: Callable, kwargs: dict) -> Any:
        leaves, spec = pytree.tree_flatten(kwargs, is_leaf=_is_opaque)
        # Python state that changes the step: which cross-attention caches are filled.
        is_updated = getattr(slot.cache, "is_updated", None)
        filled = tuple(sorted((is_updated or {}).items()))
        key = (spec, tuple(_describe(leaf) for leaf in leaves), filled)
        graph = slot.graphs.get(key)
        if graph is None:
            if len(slot.graphs) >= MAX_GRAPHS_PER_SLOT:
                if not slot.over_limit:
                    slot.over_limit = True
                    warnings.warn(
                        f'cuda_graphs="step": decode steps of this batch need more than {MAX_GRAPHS_PER_SLOT} '
                        "graphs (arguments that change every step?); running the others eagerly",
                        stacklevel=2,
                    )
                self.counts["eager"] += 1
                return forward(**kwargs)
            device = next(self.model.parameters()).device
            state = None
            if isinstance(is_updated, dict):
                # Through the cache, not the slot: a graph holding its slot would form a reference cycle,
                # so dropped graphs (and their CUDA memory) would wait for the cyclic collector.
                cache = slot.cache
                state = (lambda: dict(cache.is_updated), lambda snap: cache.is_updated.update(snap))
            try:
                with captured_calls() as reads:
                    graph = _StepGraph(forward, leaves, spec, self.capture, device, state)
                graph.read_calls = list(reads)
            except Exception as e:
                self.broken = f"capturing a decode step failed ({type(e).__name__}: {e})"
                raise RuntimeError(
                    f"{self.broken}; later calls run plain generate. The usual cause is a host read of a tensor "
                    "value in the step: find it on a CPU with hf_moe_opt.step_graphs.EagerCapture(), or use "
                    "cuda_graphs=True (per-layer graphs)."
                ) from e
            slot.graphs[key] = graph
            self.counts["captures"] += 1
            outputs, graph.first_outputs = graph.first_outputs, None
            return _own(outputs, graph.substitutions(leaves), clone=False)
        self.counts["replays"] += 1
        # The replayed step's routing to the caches' policies: the read-behind calls the capture saw
        # (a stand-in capture runs nothing then, but runs them in each replay).
        with captured_calls() as replayed:
            out = _own(graph(leaves), graph.substitutions(leaves), clone=True)
        for reads, tokens in graph.read_calls + replayed:
            reads.after_replay(tokens)
        return out


def _static_layers(cache) -> list:
    """The layers of a static cache (both caches of an ``EncoderDecoderCache``)."""
    caches = [getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)]
    caches = [c for c in caches if c is not None] or [cache]
    return [layer for c in caches for layer in getattr(c, "layers", [])]


@contextmanager
def _overriding(objects: list, name: str, make: Callable[[Any], Callable]) -> Iterator[None]:
    """``obj.<name>`` replaced by ``make(obj)`` on each object's instance, for the duration of the block."""
    for obj in objects:
        obj.__dict__[name] = make(obj)
    try:
        yield
    finally:
        for obj in objects:
            obj.__dict__.pop(name, None)


def _in_place_reorder_of(layer) -> Callable[[torch.Tensor], None]:
    def reorder(beam_idx: torch.Tensor) -> None:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            return  # not filled yet (lazily initialised layers): nothing to reorder
        index = beam_idx.to(keys.device)
        keys.copy_(keys.index_select(0, index))
        values.copy_(values.index_select(0, index))

    return reorder


def _in_place_reorder(cache) -> AbstractContextManager[None]:
    """Beam search's cache reordering, done in place for the duration of a ``generate`` call.

    transformers reorders a cache layer by rebinding its ``keys`` and ``values`` to new tensors
    (``index_select``); a captured step would go on reading and writing the old ones. Here the
    reordered rows are copied back into the same tensors, so the graphs see them.
    """
    return _overriding(_static_layers(cache), "reorder_cache", _in_place_reorder_of)


_POSITIONS = "NllbMoeSinusoidalPositionalEmbedding"


def forget_pools(capture: object) -> None:
    """``capture.forget_pools()`` where the capture has it (one written before it existed may not)."""
    forget = getattr(capture, "forget_pools", None)
    if callable(forget):
        forget()


def follow_weights(runner: Any) -> None:
    """Before a graph runner (``_index``, ``_weights_key``, ``clear()``) replays: its graphs are dropped
    if the weights were moved, cast or re-pointed since (they read the old memory), and the routers'
    float32 weight copies take weights written in place since (``load_state_dict``), which the graphs
    read through the copies without running the router."""
    weights_key = runner._index.weights_key()
    if weights_key != runner._weights_key:
        runner.clear()
        runner._weights_key = weights_key
    for _, module in runner._index.modules():
        if isinstance(module, OptimizedMoE):
            refresh_router_cast_of(module.router)


def _indexed_module(name: str, module: nn.Module) -> bool:
    """The modules a step-graph call looks at: the optimized layers and NLLB-MoE's position tables."""
    return isinstance(module, OptimizedMoE) or type(module).__name__ == _POSITIONS


def _capturable_position_forward(module: nn.Module) -> Callable:
    def forward(input_ids=None, inputs_embeds=None, cache_length=0):
        if not (torch.is_tensor(cache_length) and input_ids is not None):
            return type(module).forward(module, input_ids, inputs_embeds, cache_length)
        batch, seq_len = input_ids.shape
        positions = module.create_position_ids_from_input_ids(input_ids, module.padding_idx, cache_length)
        table = module.weights
        return table.index_select(0, positions.view(-1)).view(batch, seq_len, table.shape[-1]).detach()

    return forward


def _capturable_positions(
    model: nn.Module, length: int, modules: list[nn.Module] | None = None
) -> AbstractContextManager[None]:
    """NLLB-MoE's sinusoidal position embedding, made capturable for the duration of a generate call.

    Its forward compares ``cache_length + seq_len`` with its table size in Python to grow the table;
    with a static cache that length is a device tensor, so the comparison would read the GPU every
    step. The table is grown here once, on the host, to cover the slot's ``length`` positions, and
    steps given a tensor length skip the check (positions and lookup are the module's own).
    """
    modules = model.modules() if modules is None else modules
    modules = [m for m in modules if type(m).__name__ == _POSITIONS]
    for module in modules:
        needed = module.padding_idx + 1 + length
        if module.weights.size(0) < needed:
            module.make_weights(needed + module.offset, module.embedding_dim, module.padding_idx)
    return _overriding(modules, "forward", _capturable_position_forward)


def attach(model: nn.Module, capture: Capture | None = None) -> StepGraphs:
    """Route ``model.generate`` through a new :class:`StepGraphs`; returns it."""
    check_supported(model)
    runner = StepGraphs(model, capture)
    model.__dict__[_ATTRIBUTE] = runner
    model.generate = runner.generate
    return runner


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (no-op when nothing is attached)."""
    runner = model.__dict__.pop(_ATTRIBUTE, None)
    if runner is not None:
        runner.clear()
        model.__dict__.pop("generate", None)


def runner_of(model: nn.Module) -> StepGraphs | None:
    """The :class:`StepGraphs` attached to ``model``, or None."""
    return model.__dict__.get(_ATTRIBUTE)
