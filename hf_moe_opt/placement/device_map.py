"""Accelerate device maps that put every expert where a placement plan says.

``device_map_for(model, plan)`` (also ``plan.device_map(model)``) returns a map for
``from_pretrained(..., device_map=...)``:

* the dense modules (embeddings, attention, routers, norms, ...) are placed by accelerate's own
  balancing (``get_balanced_memory`` + ``infer_auto_device_map`` with the model's
  ``_no_split_modules``), computed on the model *without* its experts and with each device's memory
  budget reduced by the experts the plan puts there (replica copies included, since
  ``optimize(model, placement=plan)`` makes them on load);
* each expert module ``<layer>.experts.expert_{j}`` maps to its home device (first replica);
* a layer with fused ``[E, ...]`` expert tensors (Mixtral, Qwen, OLMoE, DeepSeek, GPT-OSS) has one
  ``<layer>.experts`` module that accelerate cannot split: it maps to ``"cpu"`` (host memory, or
  accelerate's CPU offload when the rest is on GPUs), and ``optimize(model, placement=plan)``
  copies every device's slices there (the devices' budgets are reduced by those slices as above);
* modules on the path from an accelerate entry down to an MoE layer are split into their children,
  so no key of the map contains another (what accelerate and transformers expect).

The map is meant for ``hf_moe_opt.optimize(model, placement=plan)``, which moves tokens to the
experts' devices itself. The plain transformers forward of such a model would not run (its sparse
block mixes expert outputs from several devices).

Typical use::

    with accelerate.init_empty_weights():
        skeleton = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(name))
    device_map = plan.device_map(skeleton, dtype=torch.bfloat16)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.bfloat16, device_map=device_map)
    hf_moe_opt.optimize(model, placement=plan)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..devices import visible_gpus
from ..experts.layout import expert_containers, expert_layout, expert_modules
from .plan import PlacementPlan

DeviceKey = int | str


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: block}`` of the model's sparse MoE blocks (optimized layers or HF blocks)."""
    from ..api import _find_blocks, optimized_layers

    found = {name: layer for name, layer in optimized_layers(model)}
    if not found:
        found = {name: block for name, _, _, block, _ in _find_blocks(model)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no supported sparse MoE block to place")
    return found


def _dtype_size(dtype: Any) -> int | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty((), dtype=dtype).element_size()


def _module_bytes(module: nn.Module, dtype_size: int | None) -> int:
    total = 0
    for p in module.parameters():
        size = p.element_size() if dtype_size is None or not p.is_floating_point() else dtype_size
        total += p.numel() * size
    return total


def _parse_memory(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return int(value) if isinstance(value, int) else int(convert_file_size_to_int(value))


def _reinsert(owner: nn.Module, keys: list[str], removed: dict[str, nn.Module]) -> None:
    """Put detached children back, every child at its original position (``keys``: the order before)."""
    current = dict(owner._modules)
    owner._modules.clear()
    for key in keys:
        owner._modules[key] = removed[key] if key in removed else current.pop(key)
    owner._modules.update(current)  # anything added meanwhile (nothing, normally) goes last


def _split_along(
    model: nn.Module, key: str, target: str, device: DeviceKey, out: dict[str, DeviceKey], leaf_split
) -> None:
    """Replace entry ``key`` (an ancestor of ``target`` or ``target`` itself) by finer entries."""
    module = model.get_submodule(key) if key else model
    prefix = f"{key}." if key else ""
    if key == target:
        leaf_split(module, prefix, device, out)
        return
    for pname, _ in module.named_parameters(recurse=False):
        out[prefix + pname] = device
    for bname, _ in module.named_buffers(recurse=False):
        out[prefix + bname] = device
    for cname, _ in module.named_children():
        child = prefix + cname
        if target == child or target.startswith(child + "."):
            _split_along(model, child, target, device, out, leaf_split)
        else:
            out[child] = device


def device_map_for(
    model: nn.Module,
    plan: PlacementPlan,
    *,
    devices: Sequence[DeviceKey] | None = None,
    max_memory: Mapping[DeviceKey, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    dtype: Any = None,
    balanced: bool = True,
) -> dict[str, DeviceKey]:
    """A ``from_pretrained`` device map: dense modules by accelerate, experts by ``plan``.

    Args:
        model: the model (an ``init_empty_weights`` skeleton is enough), optimized or not.
        plan: a placement plan covering every MoE layer of the model.
        devices: device-map value of each plan device (default: plan device ``d`` -> GPU ``d``).
        max_memory: per device memory budget as accelerate takes it (default: what accelerate
            measures on the visible devices). Must list every device in ``devices``.
        no_split_module_classes: modules accelerate must keep whole (default the model's
            ``_no_split_modules``).
        dtype: the dtype the weights will be loaded in (sizes the experts; default their dtype).
        balanced: balance the dense modules over the devices (``get_balanced_memory``) as
            ``device_map="balanced"`` does; False fills the devices in order.

    Returns:
        An ordered ``{module or tensor name: device}`` map with every expert module listed (fused
        experts modules as ``"cpu"``).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if devices is None and max_memory is None:  # accelerate would measure GPUs that are not there
        visible = visible_gpus()
        if visible < plan.num_devices:
            raise ValueError(
                f"the plan spreads experts over {plan.num_devices} devices and devices= defaults to GPUs "
                f"0..{plan.num_devices - 1}, but {visible} CUDA device(s) are visible; pass devices=[...] "
                "(e.g. ['cpu', 'cpu'] to try it without GPUs) or max_memory= for the GPUs to plan for"
            )
    targets: list[DeviceKey] = list(range(plan.num_devices)) if devices is None else list(devices)
    if len(targets) != plan.num_devices:
        raise ValueError(f"the plan has {plan.num_devices} devices; devices= lists {len(targets)}")
    blocks = _moe_blocks(model)
    missing = [n for n in blocks if n not in plan.layers]
    if missing:
        raise ValueError(f"the placement plan has no entry for MoE layers {missing[:4]}")
    size = _dtype_size(dtype)
    expert_bytes: dict[DeviceKey, int] = {t: 0 for t in targets}
    detached: list[tuple[nn.Module, list[str], dict[str, nn.Module]]] = []
    homes: dict[str, list[DeviceKey]] = {}
    fused: set[str] = set()
    host_bytes = 0
    for name, block in blocks.items():
        layout = expert_layout(block, size)
        if layout is None:
            raise ValueError(f"layer {name!r}: {type(block).__name__} keeps its experts in an unknown layout")
        if layout.num_experts != plan.num_experts(name):
            raise ValueError(
                f"layer {name!r} has {layout.num_experts} experts but the plan has {plan.num_experts(name)}"
            )
        if layout.fused:
            fused.add(name)
            host_bytes += layout.num_experts * layout.expert_bytes
        names = expert_modules(block)
        homes[name] = []
        for j in range(layout.num_experts):
            nbytes = _module_bytes(block.experts.get_submodule(names[j]), size) if names else layout.expert_bytes
            for d in plan.devices_of(name, j):
                expert_bytes[targets[d]] += nbytes
            homes[name].append(targets[plan.replicas(name, j)[0][0]])

    memory = dict(get_max_memory(None if max_memory is None else dict(max_memory)))
    for t, nbytes in expert_bytes.items():
        if t not in memory:
            raise ValueError(f"device {t!r} of the plan is not in max_memory ({sorted(map(str, memory))})")
        left = _parse_memory(memory[t]) - nbytes
        if left < 0:
            raise ValueError(
                f"the experts planned on device {t!r} need {nbytes / 2**30:.2f} GiB, more than its "
                f"{_parse_memory(memory[t]) / 2**30:.2f} GiB budget"
            )
        memory[t] = left
    if host_bytes and "cpu" in memory:
        # Fused experts load whole into host memory; optimize(placement=plan) copies each device's slices.
        memory["cpu"] = max(0, _parse_memory(memory["cpu"]) - host_bytes)
    no_split = list(no_split_module_classes or getattr(model, "_no_split_modules", None) or [])

    # Dense placement on the model without its experts (put back in the same order afterwards).
    try:
        for name, block in blocks.items():
            if name in fused:  # the whole experts module(s): one tensor per weight
                owner, gone = block, [child for child, _ in expert_containers(block)]
            else:
                owner, gone = block.experts, expert_modules(block)
            keys = list(owner._modules)
            removed = {n: owner._modules.pop(n) for n in gone}
            detached.append((owner, keys, removed))
        if balanced and len([k for k in memory if k not in ("cpu", "disk")]) > 1:
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
        dense = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    finally:
        for owner, keys, removed in detached:
            _reinsert(owner, keys, removed)
    dense = dict(dense)

    def split_block(layer: str):
        def leaf(module: nn.Module, prefix: str, device: DeviceKey, out: dict[str, DeviceKey]) -> None:
            for pname, _ in module.named_parameters(recurse=False):
                out[prefix + pname] = device
            containers = {c for c, _ in expert_containers(module)}
            for cname, child in module.named_children():
                if cname not in containers:
                    out[prefix + cname] = device
                    continue
                if layer in fused:
                    out[prefix + cname] = "cpu"
                    continue
                for pname, _ in child.named_parameters(recurse=False):
                    out[f"{prefix}experts.{pname}"] = device
                for ename in expert_modules(module):
                    out[f"{prefix}experts.{ename}"] = homes[layer][int(ename.split("_", 1)[1])]
                for oname, _ in child.named_children():
                    if not oname.startswith("expert_"):
                        out[f"{prefix}experts.{oname}"] = device

        return leaf

    result = dense
    for name in blocks:
        owner = next((k for k in result if k == "" or k == name or name.startswith(k + ".")), None)
        if owner is None:
            # accelerate already split inside the block: replace its entries under experts.
            containers = [f"{name}.{c}" for c, _ in expert_containers(blocks[name])]
            result = {k: v for k, v in result.items() if not k.startswith(tuple(containers))}
            if name in fused:
                result.update(dict.fromkeys(containers, "cpu"))
            for j, ename in enumerate(expert_modules(blocks[name])):
                result[f"{name}.experts.{ename}"] = homes[name][j]
            continue
        device = result[owner]
        finer: dict[str, DeviceKey] = {}
        _split_along(model, owner, name, device, finer, split_block(name))
        rebuilt: dict[str, DeviceKey] = {}
        for k, v in result.items():
            if k == owner:
                rebuilt.update(finer)
            else:
                rebuilt[k] = v
        result = rebuilt
    return result
