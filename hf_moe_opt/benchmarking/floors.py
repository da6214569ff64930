"""Physical floors of whole-model runs: the bytes a forward must read and the FLOPs it must do.

The counts come from running the optimized model once with hooks (nothing is timed then), so they
follow the model's own code instead of a per-family formula:

* dense weights: the parameters of every module the forward calls, each counted once (a decoder step
  does not call the cross-attention key/value projections, whose output is cached, so they are not
  counted there); an optimized MoE layer's router counts as called with the layer;
* embedding tables (``nn.Embedding``): the distinct rows looked up, unless the whole table is read
  anyway (an LM head tied to it);
* experts: per MoE layer, the distinct experts the routing chose (kept assignments only), counted on
  the batch itself. ``min(num_experts, tokens * k)`` is the most a batch can reach, not a lower bound,
  so it is not used;
* matmul FLOPs: 2 per weight-matrix element per row the module is applied to, 2 per expert-matrix
  element per kept (token, expert) assignment, plus the attention scores (``QK^T`` and ``AV``) from
  the config's layer and head counts (left out where the config does not give them);
* KV cache (decode): every step reads the keys and values of every cached position and, for
  encoder-decoders, of the whole encoder output, sized from the cache ``generate`` returns.

A floor is ``max(bytes / copy bandwidth, FLOPs / matmul rate)`` with the ceilings of
:func:`~hf_moe_opt.benchmarking.common.measure_ceilings` measured in the same run. Decode steps are
bandwidth-bound at every batch these benchmarks use; their floor is the bytes term alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import optimized_layers
from ..layer import OptimizedMoE
from .common import memory_bandwidth

GIB = 2**30


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rows(args: tuple) -> int | None:
    """Rows (tokens) a module is applied to: its first tensor argument without the last dimension."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return a.numel() // max(a.shape[-1], 1)
    return None


@dataclass
class ForwardReads:
    """What one forward read and computed (see the module docstring)."""

    weight_bytes: float = 0.0  # dense weights and embedding rows
    expert_bytes: float = 0.0
    matmul_flops: float = 0.0  # dense and experts, attention scores not included
    experts_per_layer: dict[str, int] = field(default_factory=dict)
    kept_per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def experts_mean(self) -> float | None:
        e = self.experts_per_layer
        return sum(e.values()) / len(e) if e else None


class _Record:
    def __init__(self) -> None:
        self.dense: dict[int, tuple[int, int, int]] = {}  # param ptr -> (bytes, matrix elements, rows)
        self.lookups: dict[int, tuple[nn.Embedding, list[torch.Tensor]]] = {}
        self.experts: dict[str, int] = defaultdict(int)
        self.kept: dict[str, int] = defaultdict(int)


class ReadTracer:
    """Records :class:`ForwardReads` for every call of ``root`` (a module of optimized ``model``) made
    while the tracer is entered; calls of other modules before the first one are ignored::

        with ReadTracer(model, model.get_encoder()) as tracer:
            model.get_encoder()(input_ids=ids)
        reads = tracer.reads()[0]
    """

    def __init__(self, model: nn.Module, root: nn.Module):
        self.model = model
        self.root = root
        self.layers = dict(optimized_layers(model))
        if not self.layers:
            raise ValueError("ReadTracer needs an optimized model (hf_moe_opt.optimize)")
        self._expert_ptrs: set[int] = set()
        self._per_expert: dict[str, tuple[float, float]] = {}  # layer -> (bytes, matrix elements) per expert
        for name, layer in self.layers.items():
            w1, b1, w2, b2 = layer.weights.tensors()
            e = layer.num_experts
            stored = sum(_nbytes(t) for t in (w1, b1, w2, b2) if t is not None)
            self._per_expert[name] = (stored / e, (w1.numel() + w2.numel()) / e)
            self._expert_ptrs.update(t.data_ptr() for t in (w1, b1, w2, b2) if t is not None)
            self._expert_ptrs.update(p.data_ptr() for p in layer.experts.parameters())
        self._records: list[_Record] = []
        self._handles: list = []

    def __enter__(self) -> ReadTracer:
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._pre_hook))
        for name, layer in self.layers.items():
            observer = self._observer(name)
            layer.observers.append(observer)
            self._handles.append((layer, observer))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            if isinstance(handle, tuple):
                handle[0].observers.remove(handle[1])
            else:
                handle.remove()
        self._handles.clear()

    def _observer(self, name: str):
        def observe(layer, routing) -> None:
            if not self._records:
                return
            chosen = routing.expert_index[routing.keep_mask()]
            rec = self._records[-1]
            rec.experts[name] += int(chosen.unique().numel())
            rec.kept[name] += int(chosen.numel())

        return observe

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module is self.root:
            self._records.append(_Record())
        if not self._records:
            return
        rec = self._records[-1]
        if isinstance(module, nn.Embedding):
            if args and isinstance(args[0], torch.Tensor):
                rec.lookups.setdefault(module.weight.data_ptr(), (module, []))[1].append(args[0].detach().reshape(-1))
            return
        if isinstance(module, OptimizedMoE):
            router = module.router
            params = list(router.parameters()) if isinstance(router, nn.Module) else []
        else:
            params = list(module.parameters(recurse=False))
        rows = _rows(args)
        for p in params:
            ptr = p.data_ptr()
            if ptr in self._expert_ptrs:
                continue
            matrix = p.numel() if p.dim() >= 2 else 0
            seen = rec.dense.get(ptr)
            r = rows if rows is not None else 0
            rec.dense[ptr] = (_nbytes(p), matrix, max(r, seen[2]) if seen else r)

    def reads(self) -> list[ForwardReads]:
        """One :class:`ForwardReads` per recorded call of ``root``, in order."""
        out = []
        for rec in self._records:
            reads = ForwardReads()
            for nbytes, matrix, rows in rec.dense.values():
                reads.weight_bytes += nbytes
                reads.matmul_flops += 2.0 * matrix * rows
            for ptr, (emb, indices) in rec.lookups.items():
                if ptr in rec.dense:  # the whole table is read anyway (tied LM head)
                    continue
                distinct = int(torch.cat(indices).unique().numel())
                reads.weight_bytes += distinct * emb.weight.shape[1] * emb.weight.element_size()
            for name, n in rec.experts.items():
                per_bytes, per_matrix = self._per_expert[name]
                reads.expert_bytes += n * per_bytes
                reads.matmul_flops += 2.0 * rec.kept[name] * per_matrix
            reads.experts_per_layer = dict(rec.experts)
            reads.kept_per_layer = dict(rec.kept)
            out.append(reads)
        return out


def attention_score_flops(config, batch: int, seq: int, encoder: bool) -> float:
    """FLOPs of ``QK^T`` and ``AV`` for ``batch`` sequences of ``seq`` tokens in the encoder
    (bidirectional) or, ``encoder=False``, a causal decoder's prefill; 0 when the config lacks the sizes."""
    if encoder:
        layers = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
        heads = getattr(config, "encoder_attention_heads", None) or getattr(config, "num_heads", None)
    else:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 0.0
    head_dim = getattr(config, "d_kv", None) or getattr(config, "head_dim", None)
    if not head_dim:
        hidden = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
        head_dim = hidden // heads if hidden else 0
    pairs = seq * seq if encoder else seq * (seq + 1) / 2
    return 2 * 2.0 * layers * batch * pairs * heads * head_dim


def _floor(read_bytes: float, flops: float, ceilings: dict) -> tuple[float, str]:
    t_read = read_bytes / memory_bandwidth(ceilings)
    t_flops = flops / ceilings["bf16_flops_per_s"]
    return 1e3 * max(t_read, t_flops), "bandwidth" if t_read >= t_flops else "matmul"


@torch.no_grad()
def encoder_floor(model: nn.Module, ids: torch.Tensor, ceilings: dict) -> dict:
    """Floor of one ``model.get_encoder()(input_ids=ids)`` of optimized ``model``, with what it counts."""
    encoder = model.get_encoder()
    with ReadTracer(model, encoder) as tracer:
        encoder(input_ids=ids)
    reads = tracer.reads()[0]
    batch, seq = ids.shape
    is_encoder = bool(getattr(model.config, "is_encoder_decoder", False))
    flops = reads.matmul_flops + attention_score_flops(model.config, batch, seq, encoder=is_encoder)
    read_bytes = reads.weight_bytes + reads.expert_bytes
    floor, bound = _floor(read_bytes, flops, ceilings)
    return {
        "floor_ms": floor,
        "floor_bound": bound,
        "read_gib": read_bytes / GIB,
        "expert_read_gib": reads.expert_bytes / GIB,
        "tflop": flops / 1e12,
        "experts_per_moe_layer": reads.experts_mean,
    }


def _cache_layers(cache) -> tuple[list, list]:
    """(self-attention layers, cross-attention layers) of a transformers cache."""
    if hasattr(cache, "self_attention_cache"):
        return list(cache.self_attention_cache.layers), list(cache.cross_attention_cache.layers)
    return list(cache.layers), []


def _kv_bytes(layers: list) -> tuple[float, int]:
    """(bytes of keys and values, positions held) of cache layers."""
    total, length = 0.0, 0
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            total += _nbytes(keys) + _nbytes(values)
            length = max(length, keys.shape[-2])
    return total, length


@torch.no_grad()
def decode_floor(
    model: nn.Module, ids: torch.Tensor, short: int, long: int, ceilings: dict, num_beams: int = 1
) -> dict:
    """Floor of one decode step of optimized ``model``, averaged over the steps that
    :func:`~hf_moe_opt.benchmarking.model.decode_ms_per_token` times (new tokens ``short + 1 .. long``
    of a ``generate`` from ``ids``, greedy or a beam search of ``num_beams``): the step's weights,
    experts and KV cache read over the memory bandwidth. Also returns the distinct experts per MoE
    layer (mean over those steps). Beams are traced as they really run: diverging beams route apart,
    so ``num_beams`` copies of a greedy sequence would undercount the experts."""
    if not 1 <= short < long:
        raise ValueError("need 1 <= short < long (the first forward is the prefill)")
    with ReadTracer(model, model) as tracer:
        out = model.generate(
            ids,
            max_new_tokens=long,
            min_new_tokens=long,
            do_sample=False,
            num_beams=num_beams,
            return_dict_in_generate=True,
        )
    steps = tracer.reads()[short:long]  # forward i produces new token i + 1
    if len(steps) != long - short:
        raise RuntimeError(f"expected {long} forwards from generate, traced {len(tracer.reads())}")
    cache = out.get("cache")
    if cache is None:
        cache = out.get("past_key_values")
    self_layers, cross_layers = _cache_layers(cache)
    self_bytes, held = _kv_bytes(self_layers)
    cross_bytes, _ = _kv_bytes(cross_layers)
    # The cache ends holding prompt + long - 1 positions; forward i attends over prompt + i of them.
    prompt = held - long + 1
    kv = [cross_bytes + (self_bytes * (prompt + i) / held if held else 0.0) for i in range(short, long)]
    n = len(steps)
    weights = sum(s.weight_bytes for s in steps) / n
    experts = sum(s.expert_bytes for s in steps) / n
    kv_read = sum(kv) / n
    distinct: dict[str, float] = defaultdict(float)
    for s in steps:
        for name, count in s.experts_per_layer.items():
            distinct[name] += count / n
    read_bytes = weights + experts + kv_read
    return {
        "floor_ms": 1e3 * read_bytes / memory_bandwidth(ceilings),
        "read_gib": read_bytes / GIB,
        "weight_read_gib": (weights + experts) / GIB,
        "expert_read_gib": experts / GIB,
        "kv_read_gib": kv_read / GIB,
        "experts_per_moe_layer": sum(distinct.values()) / len(distinct) if distinct else None,
        "distinct_experts_per_layer": dict(distinct),
    }
