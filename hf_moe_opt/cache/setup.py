"""``optimize(model, expert_cache=...)``: validate the options, then give each layer a cache store.

Everything that can be rejected is checked by :func:`plan_expert_cache` before the model is touched;
:meth:`ExpertCachePlan.attach` then replaces the resident stores of the built layers.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..experts.layout import expert_layout
from .budget import LayerGeometry, slots_per_layer
from .offload import check_offloaded_experts, take_over_offloaded_experts
from .policies import POLICY_NAMES, make_policy
from .store import CachedExpertStore, PrefetchChain

__all__ = ["ExpertCachePlan", "check_policy", "plan_expert_cache"]


def check_policy(cache_policy: str) -> str:
    """The normalised policy name. Raises ValueError for unknown names."""
    key = str(cache_policy).strip().lower()
    if key not in POLICY_NAMES:
        raise ValueError(f"unknown cache_policy {cache_policy!r}; choose one of {', '.join(map(repr, POLICY_NAMES))}")
    return key


def _geometry(name: str, block: nn.Module, pinned: int) -> LayerGeometry:
    layout = expert_layout(block)
    if layout is None:
        raise ValueError(
            f"{name}: expert_cache needs experts stored as separate modules (experts.expert_<j>) or as fused "
            f"[E, ...] tensors (experts.gate_up_proj or up_proj, and down_proj); {type(block).__name__} has neither"
        )
    return LayerGeometry(name, layout.num_experts, layout.expert_bytes, pinned)


def _compute_device(name: str, block: nn.Module) -> torch.device:
    """The device of the block's dense weights (its router): where the layer computes."""
    dense = [p for n, p in block.named_parameters() if not n.startswith("experts.")]
    if not dense:
        raise ValueError(f"{name}: the MoE block has no dense (router) weights to take the compute device from")
    devices = {p.device for p in dense}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"{name}: the router's weights are on the meta device (offloaded). With expert_cache, keep the dense "
            "weights on the GPU and only the experts on 'cpu' (see hf_moe_opt.cache.offload_device_map)"
        )
    if len(devices) > 1:
        raise ValueError(f"{name}: the block's dense weights are spread over {sorted(map(str, devices))}")
    return devices.pop()


def _warn_if_cpu_beside_gpu(devices: Mapping[str, torch.device]) -> None:
    """A cache that serves the CPU on a machine with a GPU is legal (a model run on the CPU on
    purpose) but most often a model whose dense parts were left on the CPU by mistake: say so once."""
    on_cpu = [n for n, d in devices.items() if d.type == "cpu"]
    if on_cpu and torch.cuda.is_available():
        warnings.warn(
            f"hf_moe_opt expert cache: {len(on_cpu)} MoE layer(s) (first: {on_cpu[0]}) compute on the CPU, where "
            "their dense weights (router) are, although CUDA is available. The cache then serves the CPU: its "
            "copies go between host buffers and save no memory anywhere. To serve a GPU, put the dense parts "
            "there first: load with device_map=hf_moe_opt.cache.offload_device_map(model) (experts on 'cpu', "
            "the rest on the GPU), or call hf_moe_opt.cache.move_dense(model, 'cuda') on a CPU-loaded model, "
            "or model.to('cuda') if it fits",
            RuntimeWarning,
            stacklevel=4,
        )


def _warn_if_reads_fall_back(layers: Sequence[tuple[str, nn.Module]], devices: Mapping[str, torch.device]) -> None:
    """Misses are read from host memory only by the Triton decode kernels: say once where a layer's
    backend is plain torch, so that ``cache_misses="read"`` copies its misses as ``"copy"`` does."""
    from ..experts.backends import resolve_backend

    plain = [n for n, layer in layers if resolve_backend(layer.backend, devices[n]) == "torch"]
    if plain:
        warnings.warn(
            f'hf_moe_opt expert cache: cache_misses="read" reads missing experts from host memory in the '
            f"Triton decode kernels only; {len(plain)} layer(s) (first: {plain[0]}, on {devices[plain[0]]}) "
            'compute with the torch backend and copy their misses as cache_misses="copy" does. Serve a CUDA '
            'device with backend="auto" or "triton" (on a CPU, TRITON_INTERPRET=1 and backend="triton" '
            "for a slow correctness run)",
            RuntimeWarning,
            stacklevel=4,
        )


def _normalise_pinned(pinned_experts: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    if pinned_experts is None:
        return {}
    if isinstance(pinned_experts, Mapping):
        unknown = sorted(set(pinned_experts) - set(names))
        if unknown:
            raise ValueError(
                f"pinned_experts names layers the model does not have: {unknown[:5]}; MoE layers are named like "
                f"{list(names[:2])} (see hf_moe_opt.optimized_layers)"
            )
        return {k: _expert_ids(v, f"pinned_experts[{k!r}]") for k, v in pinned_experts.items()}
    return dict.fromkeys(names, _expert_ids(pinned_experts, "pinned_experts"))


def _expert_ids(value: Any, what: str) -> tuple[int, ...]:
    """Expert ids from a list, tuple, set, range, array or tensor of whole numbers (never truncated)."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy array, torch tensor
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{what} must be expert ids (a list, or {{layer name: [expert ids]}}), got {type(value).__name__}"
        )
    ids = list(value)
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, numbers.Integral):
            raise TypeError(f"{what} must hold whole expert ids, got {e!r}")
    ids = [int(e) for e in ids]
    if len(set(ids)) != len(ids):  # before any slot count is derived from their number
        raise ValueError(f"{what}: pinned experts repeat an id: {ids}")
    return tuple(ids)


# What a cached decode step does with a missing expert: wait for its copy, or read it from host memory.
CACHE_MISSES = ("copy", "read")


@dataclass
class ExpertCachePlan:
    """Validated cache settings for every MoE layer, by layer name."""

    policy: str
    slots: dict[str, int]
    pinned: dict[str, tuple[int, ...]]
    devices: dict[str, torch.device]
    policy_options: dict[str, Any] | None = None
    prefetch: bool = False
    misses: str = "copy"

    def attach(self, layers: Sequence[tuple[str, nn.Module]]) -> dict[str, CachedExpertStore]:
        """Give every layer a :class:`CachedExpertStore`; warns once if pinned memory was unavailable."""
        stores = {}
        chain = PrefetchChain()  # this model's look-ahead chain (see CachedExpertStore.enable_prefetch)
        for name, layer in layers:
            _experts_rest_to(layer, self.devices[name])
            store = CachedExpertStore(
                layer.weights,
                self.slots[name],
                self.devices[name],
                policy=self.policy,
                pinned=self.pinned.get(name, ()),
                policy_options=self.policy_options,
            )
            if self.prefetch:
                store.enable_prefetch(getattr(layer, "router", None), chain)
            if self.misses == "read":
                store.enable_host_reads()
            layer.store = store
            stores[name] = store
        if self.misses == "read":
            _warn_if_reads_fall_back(layers, self.devices)
        errors = {s.pin_error for s in stores.values() if s.pin_error}
        if errors:
            warnings.warn(
                "hf_moe_opt expert cache: pinned (page-locked) host memory is unavailable "
                f"({'; '.join(sorted(errors))}); the experts stay in pageable host memory, so host-to-device "
                "copies are slower and do not overlap with compute",
                RuntimeWarning,
                stacklevel=3,
            )
        return stores


def experts_rest(layer: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """``(module, name, tensor)`` of every parameter and buffer of the layer's experts module that is not
    part of an expert weight stack (Ergo's and Muse Spark's per-expert output norms)."""
    experts = getattr(layer, "experts", None)
    if not isinstance(experts, nn.Module):
        return []
    streamed = {id(p) for stack in layer.weights.stacks() for p in stack.params}
    return [
        (module, key, t)
        for module in experts.modules()
        for key, t in [*module._parameters.items(), *module._buffers.items()]
        if t is not None and id(t) not in streamed
    ]


def _experts_rest_to(layer: nn.Module, device: torch.device) -> None:
    """The store streams the expert weight stacks only: the experts module's other tensors go where the
    layer computes. A model whose experts module was left in host memory (``move_dense``, an
    ``offload_device_map``) would otherwise index them there with the device's routing."""
    for module, key, t in experts_rest(layer):
        if t.device == device:
            continue
        if key in module._parameters:
            t.data = t.data.to(device)
        else:
            module._buffers[key] = t.to(device)


def plan_expert_cache(
    blocks: Sequence[tuple[str, nn.Module]],
    expert_cache: Any,
    cache_policy: str,
    pinned_experts: Any,
    *,
    policy_options: Mapping[str, Any] | None = None,
    prefetch: bool = False,
    misses: str = "copy",
) -> ExpertCachePlan:
    """Check ``optimize``'s cache options against the model's sparse blocks and plan the slots.

    Accelerate offload hooks on the experts are taken over here, after every check passed.

    Raises:
        ValueError / TypeError: the messages say what to change.
    """
    policy = check_policy(cache_policy)
    if policy_options is not None and not isinstance(policy_options, Mapping):
        raise TypeError(f"cache_policy_options must be a dict of keyword options, got {type(policy_options).__name__}")
    options = dict(policy_options or {})
    if not isinstance(prefetch, bool):
        raise TypeError(f"cache_prefetch must be True or False, got {prefetch!r}")
    if misses not in CACHE_MISSES:
        raise ValueError(f"cache_misses must be one of {CACHE_MISSES}, got {misses!r}")
    if misses == "read" and prefetch:
        raise ValueError('cache_misses="read" cannot be combined with cache_prefetch=True (no look-ahead needed)')
    names = [n for n, _ in blocks]
    pinned = _normalise_pinned(pinned_experts, names)
    geometry = [_geometry(n, b, len(pinned.get(n, ()))) for n, b in blocks]
    slots = slots_per_layer(expert_cache, geometry)
    for g, s in zip(geometry, slots, strict=True):
        try:
            make_policy(policy, s, g.num_experts, pinned.get(g.name, ()), **options)
        except ValueError as err:
            raise ValueError(f"{g.name}: {err}") from None
    devices = {n: _compute_device(n, b) for n, b in blocks}
    _warn_if_cpu_beside_gpu(devices)
    for n, b in blocks:  # every block checked before any is touched
        check_offloaded_experts(n, b)
    for n, b in blocks:
        take_over_offloaded_experts(n, b)
    return ExpertCachePlan(
        policy, dict(zip(names, slots, strict=True)), pinned, devices, options or None, prefetch, misses
    )
