"""Expert buffering on one GPU: copy bandwidth, decode time vs fraction resident, policy hit rates.

    python benchmarks/bench_cache.py --out benchmarks/results/cache_h200.json
    python benchmarks/bench_cache.py --parts model --out benchmarks/results/cache_model_h200.json
    python benchmarks/bench_cache.py --smoke --out /tmp/cache.json      # tiny shapes (CPU or GPU)

Measures, in one run:

* pinned and pageable host-to-device bandwidth (the ceiling the cache's copies are compared to);
* ``decode`` (part ``stack``), the worst case: a stack of MoE blocks only (no attention, no dense
  layers, so nothing runs beside the copies to hide them) with the switch-base-128 and nllb-moe-54b
  layer shapes (bf16, random weights), decode time per token at batch 1 and 8, fully resident and with
  50% / 25% of each layer's experts resident (``optimize(expert_cache=fraction)``), with the
  cache's hit rate, achieved copy bandwidth and the fraction of copy time hidden behind compute,
  for each policy of ``--stack-policies``. Tokens follow a sticky, Zipf-skewed mixture of prototype
  hidden states, so routing has temporal locality. Steady state: ``--warmup`` steps run first (the
  cache fills), then ``--steps`` are timed and counted; with a short warm-up (``--warmup 10``) the
  rows show a cold start instead, mostly first loads no policy avoids. Every setting is its own
  model, all alive together, and the timed steps go through them in turn, ``--block-steps`` at a
  time, so host jitter hits all alike (paired blocks). Beside each cached row: Belady's MIN on the
  same routing (recorded from the resident stack) and the floors it implies, the bytes no policy can
  avoid copying over the pinned bandwidth (``belady_floor_ms_per_token``: copies fully hidden;
  ``belady_serial_ms_per_token``: copies added to the resident time, as a step that learns its
  experts from its own router must wait for them);
* ``model_decode`` (part ``model``): whole models, the real HF classes with the real configs'
  dimensions but fewer layers (switch-base-128 dims with 4 encoder + 4 decoder blocks, every other
  one sparse as in the real config; nllb-moe-54b dims with 4 + 4 layers, every fourth sparse as in the
  real config: one MoE layer each side, 8.6 GB of experts each), random bf16 weights, greedy
  ``model.generate`` with a KV cache from random prompt token ids, exactly ``--new-tokens`` new
  tokens, batch 1 and 8, fully resident and 50% / 25% resident under LIFO and a second policy. Time
  per new token is the mean gap between consecutive decode steps (taken at every step with a
  synchronisation, so prefill and the first step are left out), median over repeats after a warm-up
  generation; beside it the ratio to fully resident, the hit rate (all layers, and decoder layers
  only: the decode steps), bytes copied, copy bandwidth vs the pinned bandwidth of the same run and
  the GPU peak memory. Random weights route tokens the way a random router does, not a trained one:
  hit rates here are indicative only;
* ``hit_rates`` (part ``hit_rates``): hit rates of every policy and Belady on synthetic skewed traces
  (``hf_moe_opt.cache``).

Writes JSON to ``--out`` and a PNG beside it. CUDA only, except ``--smoke`` (tiny shapes and configs
on the CPU: checks that the script runs; its times mean nothing). On an H200: part ``stack`` about 2
minutes with two policies; every setting's model stays alive, so the nllb-moe-54b shape holds 8.6 GB
of GPU memory for the resident model plus each cached model's slots, and 8.6 GB of pinned host
memory per cached setting (34 GB with two policies, 69 GB with ``--prefetch`` too); part ``model``
about 3 to 5 minutes, ~25 GB of GPU memory at most
(the nllb-moe-54b-dims model: 19 GB of bf16 weights, plus one layer's expert stack while ``optimize``
stacks them) and ~17 GB of pinned host memory; part ``hit_rates`` a few seconds. Run the parts as
separate commands where one command's time is limited.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hf_moe_opt
from hf_moe_opt.benchmarking.common import LAYER_SHAPES, environment, json_out, save_result
from hf_moe_opt.benchmarking.copy_trace import trace_copies
from hf_moe_opt.benchmarking.model import random_model, real_config
from hf_moe_opt.cache import POLICY_NAMES, BeladyPolicy, hit_rate_curve, synthetic_trace
from hf_moe_opt.cache.store import copy_pairs, expert_nbytes
from hf_moe_opt.layer import OptimizedMoE

FRACTIONS = (1.0, 0.5, 0.25)


class MoEStack(nn.Module):
    """``num_layers`` HF sparse MoE blocks applied with residuals; enough for ``optimize`` to find them."""

    def __init__(self, family: str, num_layers: int, shape: tuple[int, int, int, int] | None = None):
        super().__init__()
        e, d, f, k = shape or LAYER_SHAPES["switch-base-128" if family == "switch" else "nllb-moe-54b"]
        if family == "switch":
            from transformers import SwitchTransformersConfig
            from transformers.models.switch_transformers.modeling_switch_transformers import (
                SwitchTransformersSparseMLP,
            )

            self.config = SwitchTransformersConfig(d_model=d, d_ff=f, num_experts=e, expert_capacity=1 << 20)
            self.blocks = nn.ModuleList(SwitchTransformersSparseMLP(self.config) for _ in range(num_layers))
        else:
            from transformers import NllbMoeConfig
            from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

            self.config = NllbMoeConfig(d_model=d, encoder_ffn_dim=f, decoder_ffn_dim=f, num_experts=e)
            self.blocks = nn.ModuleList(NllbMoeSparseMLP(self.config, f) for _ in range(num_layers))
        self.d_model = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Host-to-device bytes/s from pinned and from pageable memory (median of 5); None off CUDA."""
    if device.type != "cuda":
        return {"pinned_h2d_bytes_per_s": None, "pageable_h2d_bytes_per_s": None}
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind, pin in (("pinned", True), ("pageable", False)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"{kind}_h2d_bytes_per_s"] = nbytes / times[len(times) // 2]
        del src
    return out


def expert_copy_bandwidth(model: nn.Module, repeats: int = 20) -> float | None:
    """Bytes/s of one expert's load as the cache issues it (each tensor's slice, pinned host -> its
    slot, on a side stream; CUDA events, median of ``repeats``): the pinned rate at the copy size the
    cache works with, beside the 1 GiB copy of :func:`pinned_bandwidth`. An expert already in a slot
    is copied onto itself, so the cache's contents do not change. None off CUDA or without a cache."""
    store = next((m.store for m in model.modules() if isinstance(m, OptimizedMoE)), None)
    if store is None or not hasattr(store, "_slot_of") or not store._slot_of or store.device.type != "cuda":
        return None
    expert, slot = next(iter(store._slot_of.items()))
    pairs = [(dst[slot], src[expert]) for dst, src in zip(store._slots, store._host_tensors(), strict=True)]
    stream = torch.cuda.Stream(device=store.device)
    stream.wait_stream(torch.cuda.current_stream(store.device))
    times = []
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            copy_pairs(pairs, non_blocking=True)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    torch.cuda.current_stream(store.device).wait_stream(stream)
    return store.expert_nbytes / (statistics.median(times[2:]) * 1e-3)


def _optimize(model: nn.Module, **kwargs) -> None:
    """``optimize``; the pinned-memory fallback's warning (CPU smoke runs) is expected, not news."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hf_moe_opt.optimize(model, **kwargs)


def cache_totals(stats: dict) -> dict:
    """Hit rate, bytes copied, copy bandwidth and stalls summed over the layers of ``hf_moe_opt.stats``."""
    stats = list(stats.values())
    hits = sum(s["hits"] for s in stats)
    misses = sum(s["misses"] for s in stats)
    copied = sum(s["bytes_copied"] for s in stats)
    copy_ms = sum(s["copy_time_ms"] for s in stats)
    stall_ms = sum(s["stall_time_ms"] for s in stats)
    return {
        "hit_rate": hits / max(hits + misses, 1),
        "bytes_copied": copied,
        "copy_bytes_per_s": copied / (copy_ms * 1e-3) if copy_ms else None,
        "copy_ms": copy_ms,
        "stall_ms": stall_ms,
        "host_ms": sum(s["host_time_ms"] for s in stats),
        "hidden_copy_fraction": 1.0 - stall_ms / copy_ms if copy_ms else None,
        "slot_bytes": sum(s["slot_bytes"] for s in stats),
        "host_pinned": all(s["host_pinned"] for s in stats),
        "prefetched": sum(s.get("prefetched", 0) for s in stats),
        "prefetch_hits": sum(s.get("prefetch_hits", 0) for s in stats),
    }


def add_copy_floor(row: dict, resident_ms: float, steps: int, pinned_bytes_per_s: float | None) -> None:
    """``x_resident`` and, with a measured pinned bandwidth, the copy floor and ``x_copy_floor``."""
    row["x_resident"] = row["ms_per_token"] / resident_ms
    row["bytes_copied_per_token"] = row["bytes_copied"] / steps
    if pinned_bytes_per_s:
        copy_ms = 1e3 * row["bytes_copied_per_token"] / pinned_bytes_per_s
        row["copy_floor_ms_per_token"] = max(resident_ms, copy_ms)
        row["x_copy_floor"] = row["ms_per_token"] / row["copy_floor_ms_per_token"]


def token_stream(d: int, batch: int, steps: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Hidden states with temporal locality: each row sticks to its prototype with p=0.7, else redraws
    one from 64 Zipf-popular prototypes; small noise on top."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(64, d, generator=g)
    pop = 1.0 / torch.arange(1, 65, dtype=torch.float64)
    current = torch.multinomial(pop, batch, replacement=True, generator=g)
    out = []
    for _ in range(steps):
        redraw = torch.rand(batch, generator=g) > 0.7
        current = torch.where(redraw, torch.multinomial(pop, batch, replacement=True, generator=g), current)
        h = protos[current] + 0.1 * torch.randn(batch, d, generator=g)
        out.append(h.view(batch, 1, d).to(device, torch.bfloat16))
    return out


@torch.no_grad()
def decode_ms(model: nn.Module, stream: list[torch.Tensor], warmup: int) -> float:
    """Mean time per step of a block of steps, by the host clock around synchronised ends: a cached
    step's policy and copy issue run on the host between launches, and belong in the time."""
    device = stream[0].device
    for x in stream[:warmup]:
        model(x)
    _sync(device)
    t0 = time.perf_counter()
    for x in stream[warmup:]:
        model(x)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / (len(stream) - warmup)


def record_steps(model: nn.Module, stream: list[torch.Tensor]) -> tuple[list[list[frozenset[int]]], list[int]]:
    """Per optimized layer, the experts each input of ``stream`` routes to (dropped ones left out; the
    routing profiler, one batch per input), and each layer's bytes per expert load; ``model`` must be
    optimized (resident)."""
    trace = hf_moe_opt.profile(model, stream, progress=False, coactivation=False)
    layers = hf_moe_opt.optimized_layers(model)
    steps = [[frozenset(np.flatnonzero(row).tolist()) for row in trace.counts(name)] for name, _ in layers]
    return steps, [expert_nbytes(layer.weights) for _, layer in layers]


def belady_misses(steps: list[frozenset[int]], num_slots: int, num_experts: int, warmup: int) -> tuple[int, int]:
    """``(hits, misses)`` of Belady's MIN over ``steps[warmup:]``, the cache warmed on the steps
    before, as the cached runs count them."""
    policy = BeladyPolicy(steps, num_slots, num_experts)
    hits = misses = 0
    for t, step in enumerate(steps):
        out = policy.step(sorted(step))
        if t >= warmup:
            hits, misses = hits + len(out.hits), misses + len(out.misses)
    return hits, misses


def add_belady_floor(
    row: dict,
    steps: list[list[frozenset[int]]],
    nbytes: list[int],
    num_experts: int,
    warmup: int,
    resident_ms: float,
    pinned_bytes_per_s: float | None,
) -> None:
    """Belady's hit rate on the row's routing at its slot count, and (with a measured pinned
    bandwidth) the time floors its unavoidable copies set: hidden, or added to the resident time."""
    num_slots = max(1, int(row["fraction_resident"] * num_experts + 1e-9))  # optimize's: rounded down
    hits = misses = copied = 0
    for layer_steps, layer_bytes in zip(steps, nbytes, strict=True):
        h, m = belady_misses(layer_steps, num_slots, num_experts, warmup)
        hits, misses, copied = hits + h, misses + m, copied + m * layer_bytes
    row["belady_hit_rate"] = hits / max(hits + misses, 1)
    row["belady_bytes_per_token"] = copied / (len(steps[0]) - warmup)
    if pinned_bytes_per_s:
        copy_ms = 1e3 * row["belady_bytes_per_token"] / pinned_bytes_per_s
        row["belady_floor_ms_per_token"] = max(resident_ms, copy_ms)
        row["belady_serial_ms_per_token"] = resident_ms + copy_ms
        row["x_resident_belady_serial"] = row["belady_serial_ms_per_token"] / resident_ms


# Steps of fresh tokens traced after the timed ones for the copy engine's own rate (the profiler slows
# the host: untimed; tokens already seen would find their experts resident).
DMA_STEPS = 60


def add_dma_rate(row: dict, model: nn.Module, stream: list[torch.Tensor], pinned_bytes_per_s: float | None) -> None:
    """The copy engine's rate on the cache's loads over ``stream`` (CUPTI, after the timed steps),
    beside the cache's event clock (which includes the host's submission of each load batch)."""
    found = trace_copies(lambda: decode_ms(model, stream, 0))
    row["dma"] = found
    rate = found["dma_bytes_per_s"]
    row["dma_vs_pinned_bandwidth"] = rate / pinned_bytes_per_s if rate and pinned_bytes_per_s else None


def _stack_model(family: str, num_layers: int, shape, device: torch.device, setting) -> tuple[nn.Module, int]:
    """A fresh stack (same seed: same weights for every setting), optimized for ``setting``, and the
    GPU memory it holds then (None off CUDA)."""
    fraction, ahead, policy = setting
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEStack(family, num_layers, shape).to(torch.bfloat16).eval()
    kwargs = {"expert_cache": fraction, "cache_prefetch": ahead, "cache_policy": policy} if fraction < 1.0 else {}
    _optimize(model, capacity="none", **kwargs)
    return model, (torch.cuda.memory_allocated(device) - before if cuda else None)


def bench_family(
    family: str,
    num_layers: int,
    device: torch.device,
    steps: int,
    warmup: int,
    shape: tuple[int, int, int, int] | None = None,
    pinned_bytes_per_s: float | None = None,
    block: int = 10,
    prefetch: bool = False,
    policies: tuple[str, ...] = ("lifo",),
) -> list[dict]:
    """The MoE-only stack (worst case: nothing to hide copies behind) of ``family``'s layer shape.

    Every setting (fraction, policy, look-ahead) is its own model, all built from the same seed and
    alive together. After ``warmup`` untimed steps each, the timed steps run in blocks of ``block``:
    each block goes through every model in turn (the order rotating from block to block), so host
    jitter, clocks and background work hit all settings alike. Rows give the time per token over all
    blocks and ``x_resident_block_median``, the median over blocks of the block's time over the
    resident model's time for the same block. Cached rows carry floors beside the time:
    ``max(resident time, bytes copied per token / pinned bandwidth)`` -- no policy's misses can be
    served faster than the host link moves them -- and Belady's (:func:`add_belady_floor`).
    """
    look_ahead = (False, True) if prefetch else (False,)
    cached_settings = [(f, a, p) for f in FRACTIONS if f < 1.0 for a in look_ahead for p in policies]
    resident = (1.0, False, None)
    settings = [resident, *cached_settings]
    built = {s: _stack_model(family, num_layers, shape, device, s) for s in settings}
    models = {s: m for s, (m, _) in built.items()}
    num_experts = next(m for m in models[resident].modules() if isinstance(m, OptimizedMoE)).num_experts
    rows = []
    for batch in (1, 8):
        stream = token_stream(models[resident].d_model, batch, steps + warmup, device, seed=batch)
        routed, nbytes = record_steps(models[resident], stream)  # also a warm-up of the resident model
        for setting, model in models.items():
            decode_ms(model, stream[:warmup], 0)  # kernels compiled; the cache filled, then counted afresh
            if setting != resident:
                hf_moe_opt.reset_stats(model)
        times: dict[tuple, list[float]] = {s: [] for s in settings}
        for b, first in enumerate(range(warmup, len(stream), block)):
            part = stream[first : first + block]
            turn = b % len(settings)
            for setting in settings[turn:] + settings[:turn]:
                times[setting].append(decode_ms(models[setting], part, 0))
        resident_ms = statistics.fmean(times[resident])
        for setting in settings:
            fraction, ahead, policy = setting
            ms = statistics.fmean(times[setting])  # blocks are equal but the last: close to the total / steps
            row = {
                "family": family,
                "setup": "moe_stack_only",
                "layers": num_layers,
                "batch": batch,
                "fraction_resident": fraction,
                "policy": policy,
                "prefetch": ahead,
                "ms_per_token": ms,
                "ms_per_token_blocks": times[setting],
                "gpu_bytes_held": built[setting][1],
            }
            if setting != resident:
                row.update(cache_totals(hf_moe_opt.stats(models[setting])))
                one = expert_copy_bandwidth(models[setting])
                row["expert_copy_bytes_per_s"] = one
                bw = row["copy_bytes_per_s"]
                row["copy_vs_pinned_bandwidth"] = bw / pinned_bytes_per_s if bw and pinned_bytes_per_s else None
                row["copy_vs_expert_copy"] = bw / one if bw and one else None
                row["x_resident_block_median"] = statistics.median(
                    t / r for t, r in zip(times[setting], times[resident], strict=True)
                )
                add_copy_floor(row, resident_ms, steps, pinned_bytes_per_s)
                add_belady_floor(row, routed, nbytes, num_experts, warmup, resident_ms, pinned_bytes_per_s)
                if device.type == "cuda":
                    fresh = token_stream(models[resident].d_model, batch, DMA_STEPS, device, seed=batch + 1000)
                    add_dma_rate(row, models[setting], fresh, pinned_bytes_per_s)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ms_per_token_blocks"}), flush=True)
    del models, built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ model decode
# Real configs' dimensions, fewer layers, the real configs' share of sparse layers.
MODEL_LAYERS = {
    "switch-base-128": {"num_layers": 4, "num_decoder_layers": 4, "encoder_sparse_step": 2, "decoder_sparse_step": 2},
    "nllb-moe-54b": {"encoder_layers": 4, "decoder_layers": 4, "encoder_sparse_step": 4, "decoder_sparse_step": 4},
}
# --smoke: the same classes and layer counts at toy sizes.
SMOKE_DIMS = {
    "switch-base-128": {"vocab_size": 256, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_experts": 8},
    "nllb-moe-54b": {
        "vocab_size": 256, "d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_experts": 8,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "max_position_embeddings": 128,
    },
}  # fmt: skip


def model_config(name: str, smoke: bool = False):
    """``name``'s real config with :data:`MODEL_LAYERS`' layer counts (and toy sizes for ``smoke``)."""
    cfg = copy.deepcopy(real_config(name))
    for key, value in {**MODEL_LAYERS[name], **(SMOKE_DIMS[name] if smoke else {})}.items():
        setattr(cfg, key, value)
    return cfg


class _StepClock:
    """A stopping criterion that never stops: it takes the time (after a device sync) at every
    generation step, so decode steps can be timed apart from the prefill."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens; its total, prefill and per-decode-step times."""
    from transformers import StoppingCriteriaList

    clock = _StepClock(ids.device)
    _sync(ids.device)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    _sync(ids.device)
    t1 = time.perf_counter()
    steps = clock.times
    return out, {
        "total_ms": (t1 - t0) * 1e3,
        "prefill_ms": (steps[0] - t0) * 1e3,  # encoder and the first decoder step
        "decode_ms_per_token": (steps[-1] - steps[0]) * 1e3 / max(len(steps) - 1, 1),
    }


def bench_model_decode(
    name: str,
    device: torch.device,
    batches: list[int],
    policies: list[str],
    new_tokens: int,
    prompt: int,
    repeats: int,
    bandwidth: dict,
    smoke: bool = False,
) -> list[dict]:
    """Decode time per new token of ``name`` (fewer layers, random weights) at each fraction and policy."""
    cfg = model_config(name, smoke)
    model = random_model(name, device, cfg)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    prompts = {b: torch.randint(3, min(1000, vocab), (b, prompt), generator=gen).to(device) for b in batches}
    settings = [(1.0, None)] + [(f, p) for f in FRACTIONS if f < 1.0 for p in policies]
    pinned = bandwidth.get("pinned_h2d_bytes_per_s")
    layers = {k: getattr(cfg, k) for k in MODEL_LAYERS[name]}
    rows, resident = [], {}
    for fraction, policy in settings:
        cached = fraction < 1.0
        if cached:
            _optimize(model, expert_cache=fraction, cache_policy=policy)
        else:
            _optimize(model)
        for batch in batches:
            ids = prompts[batch]
            _reset_peak(device)
            tokens, _ = timed_generate(model, ids, new_tokens)  # warm-up: kernels compiled, slots filled
            if cached:
                hf_moe_opt.reset_stats(model)
            runs = [timed_generate(model, ids, new_tokens) for _ in range(repeats)]
            ms = statistics.median(r[1]["decode_ms_per_token"] for r in runs)
            if not cached:
                resident[batch] = (ms, tokens)
            base_ms, base_tokens = resident[batch]
            row = {
                "model": name,
                "layers": layers,
                "batch": batch,
                "prompt_tokens": prompt,
                "new_tokens": new_tokens,
                "repeats": repeats,
                "fraction_resident": fraction,
                "policy": policy,
                "ms_per_new_token": ms,
                "ms_per_new_token_runs": [r[1]["decode_ms_per_token"] for r in runs],
                "ratio_to_resident": ms / base_ms,
                "generate_ms": statistics.median(r[1]["total_ms"] for r in runs),
                "prefill_ms": statistics.median(r[1]["prefill_ms"] for r in runs),
                "tokens_equal_resident": all(torch.equal(r[0], base_tokens) for r in runs),
                "gpu_peak_bytes": _peak_bytes(device),
            }
            if cached:
                stats = hf_moe_opt.stats(model)
                row.update(cache_totals(stats))
                dec = cache_totals({k: v for k, v in stats.items() if "decoder" in k})
                row["decoder_hit_rate"] = dec["hit_rate"]
                row["decoder_bytes_per_new_token"] = dec["bytes_copied"] / (repeats * new_tokens)
                row["bytes_copied_per_generate"] = row["bytes_copied"] / repeats
                bw = row["copy_bytes_per_s"]
                row["copy_vs_pinned_bandwidth"] = bw / pinned if bw and pinned else None
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ms_per_new_token_runs"}), flush=True)
        hf_moe_opt.restore(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def policy_hit_rates(steps: int = 2000) -> list[dict]:
    rows = []
    for name, (e, k, tokens) in {"switch-base-128 decode": (128, 1, 8), "nllb-moe-54b decode": (128, 2, 8)}.items():
        trace = synthetic_trace(e, k, tokens, steps, zipf_s=1.0, stickiness=0.6, seed=0)
        slots = [8, 16, 32, 64]
        curve = hit_rate_curve(trace, POLICY_NAMES, slots)
        rows.append({"trace": name, "num_experts": e, "top_k": k, "tokens_per_step": tokens, "slots": slots, **curve})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _label(row: dict) -> str:
    ahead = ", look-ahead" if row.get("prefetch") else ""
    return f"{row['family']} b{row['batch']} {row['fraction_resident']:g} {row.get('policy') or ''}{ahead}"


def _plot_stack_ratios(ax, rows: list[dict]) -> None:
    """Decode time over resident per (shape, batch, policy, look-ahead), Belady serial dotted, 1.5x line."""
    for family in ("switch", "nllb"):
        for batch in (1, 8):
            part = [r for r in rows if r["family"] == family and r["batch"] == batch and r["fraction_resident"] < 1.0]
            variants = dict.fromkeys((r.get("policy"), r.get("prefetch", False)) for r in part)
            for n, (policy, ahead) in enumerate(variants):
                mine = [r for r in part if (r.get("policy"), r.get("prefetch", False)) == (policy, ahead)]
                line = ax.plot(
                    [1.0] + [r["fraction_resident"] for r in mine],
                    # The median over interleaved blocks (robust to a stall in one block); older results
                    # carry only the ratio of the means.
                    [1.0] + [r.get("x_resident_block_median", r["x_resident"]) for r in mine],
                    marker="o",
                    linestyle="--" if ahead else "-",
                    label=f"{family} b{batch} {policy}" + (", look-ahead" if ahead else ""),
                )[0]
                floors = [r for r in mine if r.get("x_resident_belady_serial")]
                if floors and n == 0:  # Belady's floor depends on the routing only: once per shape and batch
                    ax.plot(
                        [r["fraction_resident"] for r in floors],
                        [r["x_resident_belady_serial"] for r in floors],
                        marker="x",
                        linestyle=":",
                        color=line.get_color(),
                        label=f"{family} b{batch}: resident + Belady's copies",
                    )
    ax.axhline(1.5, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="fraction of experts resident", ylabel="decode time / fully resident (median over blocks)")
    ax.set_title("MoE blocks only (worst case: nothing hides the copies)", fontsize=10)
    ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = result.get("decode", [])
    model_rows = result.get("model_decode", [])
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _plot_stack_ratios(axes[0][0], stack)

    ax = axes[0][1]
    if model_rows:
        for key in dict.fromkeys((r["model"], r["batch"]) for r in model_rows):
            for policy in dict.fromkeys(r["policy"] for r in model_rows if r["policy"]):
                rows = [r for r in model_rows if (r["model"], r["batch"]) == key and r["policy"] in (None, policy)]
                ax.plot(
                    [r["fraction_resident"] for r in rows],
                    [r["ratio_to_resident"] for r in rows],
                    marker="o",
                    label=f"{key[0]}, batch {key[1]}, {policy}",
                )
        ax.axhline(1.5, color="k", linestyle=":", label="1.5x")
        ax.set(xlabel="fraction of experts resident", ylabel="decode time / fully resident (median over blocks)")
        ax.set_title("whole model (fewer layers), generate with a KV cache", fontsize=10)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    else:  # stack only: the cache's hit rate beside Belady's on the same routing
        cached = [r for r in stack if r.get("belady_hit_rate") is not None]
        xs = range(len(cached))
        ax.bar([x - 0.2 for x in xs], [r["hit_rate"] for r in cached], width=0.4, label="policy")
        ax.bar([x + 0.2 for x in xs], [r["belady_hit_rate"] for r in cached], width=0.4, label="Belady")
        ax.set_xticks(list(xs), [_label(r) for r in cached], rotation=70, fontsize=6)
        ax.set_ylim(min([r["hit_rate"] for r in cached] + [1.0]) - 0.05, 1.0)
        ax.set(ylabel="hit rate")
        ax.set_title("MoE blocks only: hit rate vs Belady on the same routing", fontsize=10)
        ax.legend(fontsize=8)

    ax = axes[1][0]
    copies = [r for r in stack if r.get("copy_bytes_per_s")]
    labels = [f"stack {_label(r)}" for r in copies]
    values = [r["copy_bytes_per_s"] / 1e9 for r in copies]
    for r in model_rows:
        if r.get("copy_bytes_per_s"):
            labels.append(f"{r['model'].split('-')[0]} b{r['batch']} {r['fraction_resident']} {r['policy']}")
            values.append(r["copy_bytes_per_s"] / 1e9)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=70, fontsize=6)
    pinned = result["bandwidth"].get("pinned_h2d_bytes_per_s")
    if pinned:
        ax.axhline(pinned / 1e9, color="k", linestyle="--", label=f"pinned H2D {pinned / 1e9:.1f} GB/s")
        ax.axhline(0.85 * pinned / 1e9, color="k", linestyle=":", label="85% of pinned")
        ax.legend(fontsize=8)
    ax.set(ylabel="GB/s")
    ax.set_title("cache copy bandwidth", fontsize=10)

    ax = axes[1][1]
    if result.get("hit_rates"):
        trace = result["hit_rates"][0]
        for name in [*POLICY_NAMES, "belady"]:
            ax.plot(trace["slots"], trace[name], marker="o", label=name)
        ax.set(xlabel="slots (of 128)", ylabel="hit rate", title=f"hit rate: {trace['trace']} (synthetic)")
        ax.legend(fontsize=8)
    elif stack:  # stack only: absolute times per step
        for family in ("switch", "nllb"):
            for batch in (1, 8):
                rows = [r for r in stack if r["family"] == family and r["batch"] == batch and not r.get("prefetch")]
                for policy in dict.fromkeys(r.get("policy") for r in rows if r.get("policy")):
                    mine = [r for r in rows if r.get("policy") in (None, policy)]
                    ax.plot(
                        [r["fraction_resident"] for r in mine],
                        [r["ms_per_token"] for r in mine],
                        marker="o",
                        label=f"{family} b{batch} {policy}",
                    )
        ax.set(xlabel="fraction of experts resident", ylabel="ms per decode step")
        ax.set_title("MoE blocks only: time per step", fontsize=10)
        ax.invert_xaxis()
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.axis("off")
    fig.suptitle(f"expert buffering, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PARTS = ("stack", "model", "hit_rates")
SMOKE_SHAPES = {"switch": (8, 32, 64, 1), "nllb": (8, 32, 64, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=json_out, default="benchmarks/results/cache.json")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--switch-layers", type=int, default=4, help="MoE-only stack: switch-base-128 blocks")
    p.add_argument("--nllb-layers", type=int, default=2, help="MoE-only stack: nllb-moe-54b blocks")
    p.add_argument("--steps", type=int, default=150, help="MoE-only stack: measured decode steps")
    p.add_argument(
        "--warmup", type=int, default=200, help="MoE-only stack: steps before the measured ones (they warm the cache)"
    )
    p.add_argument("--block-steps", type=int, default=10, help="MoE-only stack: timed steps per turn of a setting")
    p.add_argument(
        "--prefetch", action="store_true", help="MoE-only stack: cached fractions also with cache_prefetch=True"
    )
    p.add_argument(
        "--stack-policies", nargs="+", choices=POLICY_NAMES, default=["lifo", "adaptive"], help="MoE-only stack"
    )
    p.add_argument("--models", nargs="+", choices=list(MODEL_LAYERS), default=list(MODEL_LAYERS))
    p.add_argument("--model-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--policies", nargs="+", choices=POLICY_NAMES, default=["lifo", "lfru"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and configs (checks the script; on a GPU if any)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.new_tokens, args.prompt_tokens, args.repeats = 6, 2, 4, 6, 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # toy shapes: more threads only wait on each other on a busy CPU
        try:
            # On a GPU machine the cache must serve a GPU (it refuses dense weights left on the CPU there).
            on_gpu = torch.cuda.is_available()
            run(args, torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        return 0
    if not torch.cuda.is_available():
        print("bench_cache.py needs a CUDA device (the expert cache copies host -> GPU); --smoke runs on the CPU")
        return 0
    run(args, torch.device("cuda", torch.cuda.current_device()))
    return 0


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Every part ``args.parts`` asks for on ``device``; writes ``args.out`` and its plot."""
    result = {"environment": environment(), "smoke": args.smoke, "bandwidth": pinned_bandwidth(device)}
    print(json.dumps(result["bandwidth"]), flush=True)
    if "stack" in args.parts:
        result["decode_setup"] = "MoE blocks only, no attention or dense layers: the worst case for hiding copies"
        result["decode"] = []
        for family, layers in (("switch", args.switch_layers), ("nllb", args.nllb_layers)):
            shape = SMOKE_SHAPES[family] if args.smoke else None
            pinned = result["bandwidth"].get("pinned_h2d_bytes_per_s")
            result["decode"] += bench_family(
                family,
                layers,
                device,
                args.steps,
                args.warmup,
                shape,
                pinned,
                args.block_steps,
                args.prefetch,
                tuple(args.stack_policies),
            )
    if "model" in args.parts:
        result["model_decode_setup"] = {
            "inputs": "random prompt token ids (ids 3..999), random weights: routing is a random router's",
            "timing": "mean gap between decode steps (device sync at each step), median over repeats",
            "layers": {m: MODEL_LAYERS[m] for m in args.models},
        }
        result["model_decode"] = []
        for name in args.models:
            result["model_decode"] += bench_model_decode(
                name,
                device,
                args.model_batches,
                args.policies,
                args.new_tokens,
                args.prompt_tokens,
                args.repeats,
                result["bandwidth"],
                smoke=args.smoke,
            )
    if "hit_rates" in args.parts:
        result["hit_rates"] = policy_hit_rates(200 if args.smoke else 2000)
    save_result(result, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
