"""Routing profiler: run a model over batches and record where every MoE layer sends its tokens.

``trace = hf_moe_opt.profile(model, batches)`` returns a :class:`RoutingTrace` with, per optimized
MoE layer and per input batch, the tokens routed to each expert (kept assignments only: tokens
dropped by capacity count nowhere, nor does padding marked by the batch's ``attention_mask`` /
``decoder_attention_mask`` in a forward pass over the whole batch) and the co-activation counts of
the experts. The trace feeds :func:`hf_moe_opt.plan_placement`.

Counting happens on the model's device with scatter-add histograms (no host synchronisation per
layer call); the counts come to the host once per batch.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .trace import RoutingTrace


def _member_slots(expert_index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` with repeated choices of one expert by the same token kept only at the first slot."""
    member = keep.clone()
    top_k = expert_index.shape[1]
    for b in range(1, top_k):
        for a in range(b):
            member[:, b] &= ~(keep[:, a] & (expert_index[:, a] == expert_index[:, b]))
    return member


class _LayerCounter:
    """Per-layer accumulators for the current batch, on the routing's device."""

    def __init__(self, num_experts: int, coactivation: bool):
        self.num_experts = num_experts
        self.coactivation = coactivation
        self.counts: torch.Tensor | None = None
        self.co: torch.Tensor | None = None
        self.top_k = 0

    def add(self, expert_index: torch.Tensor, keep: torch.Tensor | None, tokens: torch.Tensor | None = None) -> None:
        """Count one layer call; ``tokens``: which of its rows are real tokens (False: padding)."""
        e = self.num_experts
        idx = expert_index.reshape(-1, expert_index.shape[-1]).long()
        keep = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep.reshape(idx.shape).bool()
        if tokens is not None:
            keep = keep & tokens.reshape(-1, 1).to(device=keep.device, dtype=torch.bool)
        kept = _member_slots(idx, keep)
        self.top_k = max(self.top_k, idx.shape[1])
        if self.counts is None:
            self.counts = torch.zeros(e, dtype=torch.int64, device=idx.device)
            if self.coactivation:
                self.co = torch.zeros(e * e, dtype=torch.int64, device=idx.device)
        idx, kept = idx.to(self.counts.device), kept.to(self.counts.device)
        key = torch.where(kept, idx, e).reshape(-1)
        hist = torch.zeros(e + 1, dtype=torch.int64, device=idx.device)
        hist.scatter_add_(0, key, torch.ones_like(key))
        self.counts += hist[:e]
        if self.coactivation and self.co is not None:
            # Every ordered pair of kept slots of a token (a slot with itself gives the diagonal).
            pair_ok = kept[:, :, None] & kept[:, None, :]
            pair = idx[:, :, None] * e + idx[:, None, :]
            pair = torch.where(pair_ok, pair, e * e).reshape(-1)
            phist = torch.zeros(e * e + 1, dtype=torch.int64, device=idx.device)
            phist.scatter_add_(0, pair, torch.ones_like(pair))
            self.co += phist[: e * e]

    def take(self) -> tuple[Any, Any]:
        """``(counts [E], coactivation [E, E] or None)`` on the host; resets for the next batch."""
        e = self.num_experts
        if self.counts is None:
            counts = torch.zeros(e, dtype=torch.int64)
            co = torch.zeros(e, e, dtype=torch.int64) if self.coactivation else None
        else:
            counts = self.counts.cpu()
            co = None if self.co is None else self.co.view(e, e).cpu()
        self.counts = None
        self.co = None
        return counts, co


def _padding_masks(batch: Any) -> list[torch.Tensor | None]:
    """``[attention_mask, decoder_attention_mask]`` of a dict batch (None where absent)."""
    if not isinstance(batch, Mapping):
        return [None, None]
    masks = [batch.get("attention_mask"), batch.get("decoder_attention_mask")]
    return [m if isinstance(m, torch.Tensor) else None for m in masks]


def _default_run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def profile(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    progress: bool = True,
    coactivation: bool = True,
    run: Callable[[nn.Module, Any], Any] | None = None,
    move_to_device: bool = True,
    max_batches: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    **optimize_kwargs: Any,
) -> RoutingTrace:
    """Record the routing of every MoE layer of ``model`` over ``batches``.

    Args:
        model: a transformers MoE model. If it is not optimized it is optimized for the run
            (``optimize_kwargs`` passed to :func:`hf_moe_opt.optimize`) and restored afterwards.
        batches: an iterable of model inputs: dicts of keyword arguments (``model(**batch)``),
            tuples (``model(*batch)``) or single tensors. For seq2seq models give decoder inputs
            (``decoder_input_ids`` or ``labels``). Padding marked by a dict batch's
            ``attention_mask`` (and, for decoder layers, ``decoder_attention_mask``) is not counted
            when the layer sees the whole batch at once (not in ``run=generate`` decode steps).
        progress: show a tqdm progress bar.
        coactivation: also record the co-activation matrix of each layer.
        run: ``run(model, batch)`` instead of the plain forward (e.g. ``m.generate(**b)``); every call
            of a layer within one batch adds to that batch's row.
        move_to_device: move tensors of each batch to the device of the model's first parameter.
        max_batches: stop after this many batches.
        metadata: extra JSON-serialisable facts stored in the trace.

    Returns:
        A :class:`RoutingTrace`: per layer (module name of the MoE block, the names placement plans
        use) a ``[num_batches, num_experts]`` count table; a layer that did not run in a batch gets a
        row of zeros.
    """
    from ..api import is_optimized, optimize, optimized_layers, restore

    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    meta = dict(metadata or {})
    RoutingTrace(meta)  # bad metadata fails here, before the model is touched
    temporary = not is_optimized(model)
    if not temporary and optimize_kwargs:
        raise ValueError(
            f"the model is already optimized; options {sorted(optimize_kwargs)} only apply when profile "
            "optimizes it for the run"
        )
    was_training = model.training
    hooks: list[tuple[nn.Module, Callable]] = []
    handles = []
    counters: dict[str, _LayerCounter] = {}
    bar = None
    if temporary:
        optimize(model, **optimize_kwargs)
    try:  # from here on, whatever fails leaves the model as it was given
        layers = optimized_layers(model)
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        # The current batch's padding masks (encoder / causal tokens, decoder tokens): a layer call whose
        # rows are exactly one mask's tokens counts only the real ones (routers such as Switch's and
        # Mixtral's route padding like any token).
        padding: list[torch.Tensor | None] = [None, None]
        names = {id(layer): name for name, layer in layers}
        # (batch, seq) of each layer's current call: a decode step of beam search can have as many rows
        # as the prompt's mask has entries ([batch * beams, 1] vs [batch, seq]) without being those tokens.
        shapes: dict[str, tuple[int, ...]] = {}

        def record_shape(layer: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                shapes[names[id(layer)]] = tuple(hidden.shape[:-1])

        for name, layer in layers:
            counters[name] = _LayerCounter(layer.num_experts, coactivation)

            def observe(layer: nn.Module, routing: Any) -> None:
                name = names[id(layer)]
                rows = routing.expert_index.shape[0]
                mask = padding[1] if seq2seq and "decoder" in name.split(".") else padding[0]
                tokens = None
                if mask is not None and mask.numel() == rows:
                    shape = shapes.get(name)
                    if shape is None or shape in (tuple(mask.shape), (1, mask.numel())):
                        tokens = mask
                counters[name].add(routing.expert_index, routing.keep, tokens)

            layer.observers.append(observe)
            hooks.append((layer, observe))
            handles.append(layer.register_forward_pre_hook(record_shape, with_kwargs=True))
        num_experts = {c.num_experts for c in counters.values()}
        if len(num_experts) > 1:
            raise ValueError(f"layers have different expert counts {sorted(num_experts)}; a trace holds one count")
        config = getattr(model, "config", None)
        model_name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
        trace = RoutingTrace(meta, model_name=model_name or None, num_experts=num_experts.pop())
        device = _model_device(model) if move_to_device else None
        runner = run or _default_run
        model.eval()
        total = None
        if max_batches is not None:
            total = int(max_batches)
        elif hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        # islice: stop before fetching batch max_batches + 1 (a generator or data loader would lose it).
        iterator: Iterable[Any] = batches if max_batches is None else itertools.islice(batches, int(max_batches))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="profiling routing", unit="batch")
        with torch.no_grad():
            for batch in iterator:
                batch = _to_device(batch, device)
                padding[:] = _padding_masks(batch)
                runner(model, batch)
                for name, counter in counters.items():
                    counts, co = counter.take()
                    trace.add_batch(name, counts, co)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for layer, fn in hooks:
            layer.observers.remove(fn)
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if temporary:
            restore(model)
    top_k = max((c.top_k for c in counters.values()), default=0)
    if top_k > 0:
        trace.metadata["top_k"] = top_k
    return trace
