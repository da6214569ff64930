"""Models larger than the GPU: experts in host memory, everything else on the GPU.

Two recipes lead to the same place, ready for ``optimize(model, expert_cache=...)``:

1. With a device map (the model never exists whole on the GPU or twice on the host)::

       with torch.device("meta"):
           skeleton = AutoModelForSeq2SeqLM.from_config(config)
       model = AutoModelForSeq2SeqLM.from_pretrained(
           name, dtype=torch.bfloat16, device_map=offload_device_map(skeleton, "cuda:0"))
       hf_moe_opt.optimize(model, expert_cache=0.25)

   accelerate offloads the ``"cpu"`` entries with hooks that keep the weights in a host-side map
   and the parameters on the meta device. ``optimize`` takes those weights over
   (:func:`take_over_offloaded_experts`): the hooks are removed, the parameters point at the host
   tensors, the map forgets them, and the cache page-locks them in one stacked copy.

2. Loaded on the CPU: ``model = from_pretrained(name, dtype=...)``, then
   ``move_dense(model, "cuda")`` and ``optimize(model, expert_cache=...)``. Needs host memory for
   the whole model (it is there anyway: the experts stay in host memory).

In both, the layer's compute device is the device of its router (the dense weights) and the
experts' home is host memory. For the fused families (Mixtral, Qwen, OLMoE, DeepSeek, GPT-OSS) a
layer's experts are one ``experts`` module with ``[E, ...]`` parameters: the device map offloads
that module whole and the take-over is the same; shared experts are its siblings and stay dense.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..devices import visible_gpus
from ..experts.layout import expert_containers

__all__ = [
    "expert_module_names",
    "move_dense",
    "offload_device_map",
    "take_over_module",
    "take_over_offloaded_experts",
]


def _sparse_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from ..layer import OptimizedMoE
    from ..patches import find_patch

    for name, module in model.named_modules():
        if isinstance(module, OptimizedMoE) or find_patch(module) is not None:
            yield name, module


def expert_module_names(model: nn.Module) -> list[str]:
    """Names of the expert containers (``experts``; JetMoE's ``input_linear`` and ``output_linear``) of every
    supported sparse MoE block of ``model``."""
    names = []
    for name, block in _sparse_blocks(model):
        names += [f"{name}.{child}" if name else child for child, _ in expert_containers(block)]
    return names


def _check_gpu(what: str, index: int) -> None:
    visible = visible_gpus()
    if index >= visible:
        raise ValueError(
            f"{what}: GPU {index} is not here ({visible} CUDA device(s) visible); "
            "pass device='cpu' to keep the dense parts on the CPU"
        )


def offload_device_map(model: nn.Module, device: int | str | torch.device = 0) -> dict[str, int | str]:
    """A ``from_pretrained`` ``device_map``: the experts on ``"cpu"``, everything else on ``device``.

    ``model`` may be a meta-device skeleton (``with torch.device("meta"): from_config(config)``).
    """
    if isinstance(device, torch.device):
        device = device.index if device.type == "cuda" and device.index is not None else str(device)
    if isinstance(device, int) or str(device).startswith("cuda"):
        _check_gpu("offload_device_map", device if isinstance(device, int) else int(str(device).partition(":")[2] or 0))
    names = expert_module_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no supported sparse MoE block")
    return {"": device, **dict.fromkeys(names, "cpu")}


@torch.no_grad()
def move_dense(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move every parameter and buffer of ``model`` to ``device`` except the experts of its sparse
    MoE blocks, which stay where they are (the recipe for ``expert_cache`` on a CPU-loaded model).
    Parameter objects are kept (``param.data`` is replaced). Returns ``model``."""
    from ..api import module_argument

    module_argument(model, "move_dense")
    device = torch.device(device)
    if device.type == "cuda":
        _check_gpu("move_dense", device.index if device.index is not None else 0)
    skip = set()
    for _, block in _sparse_blocks(model):
        for _, container in expert_containers(block):
            skip.update(id(m) for m in container.modules())
    for module in model.modules():
        if id(module) in skip:
            continue
        for p in module._parameters.values():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    return model


def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _forget(weights_map, key: str) -> None:
    """Drop ``key`` from accelerate's host-side weight map so the map holds no second reference."""
    prefix = getattr(weights_map, "prefix", "")
    dataset = getattr(weights_map, "dataset", weights_map)
    full = prefix + key
    state = getattr(dataset, "state_dict", None)
    if isinstance(state, dict):
        state.pop(full, None)
        keys = getattr(dataset, "all_keys", None)
        if isinstance(keys, list) and full in keys:
            keys.remove(full)
    elif isinstance(dataset, dict):
        dataset.pop(full, None)


def take_over_offloaded_experts(name: str, block: nn.Module) -> int:
    """Replace accelerate's hooks on ``block``'s experts by plain host-memory parameters.

    Offloaded experts (``device_map`` value ``"cpu"`` or ``"disk"``) have their parameters on the
    meta device and the weights in the hook's map; they become real CPU parameters (the same
    tensors for ``"cpu"``, read once for ``"disk"``) and the map forgets them. Alignment hooks on the
    rest of the block (the router) are removed too: the optimized layer runs on the router's device.

    Returns:
        the number of modules whose hooks were removed.

    Raises:
        ValueError: the block's router (or another dense part of it) is offloaded: dense weights
            must sit on the compute device.
    """
    hooked = check_offloaded_experts(name, block)
    for module in hooked:
        take_over_module(name, module)
    return len(hooked)


def check_offloaded_experts(name: str, block: nn.Module) -> list[nn.Module]:
    """What :func:`take_over_offloaded_experts` checks, without touching the block: its modules that
    carry accelerate hooks.

    Raises:
        ValueError: a dense part of the block is offloaded, or an offloaded weight has a dtype the
            kernels do not take (checked on the meta parameters, which carry the dtype).
    """
    from ..api import check_weight_dtypes

    hooked = [m for m in block.modules() if getattr(m, "_hf_hook", None) is not None]
    expert_ids = {id(m) for _, container in expert_containers(block) for m in container.modules()}
    for module in hooked:
        offloads = [h for h in _hooks_of(module) if getattr(h, "offload", False)]
        if id(module) not in expert_ids and offloads:
            raise ValueError(
                f"{name}: accelerate offloads a dense part of the MoE block ({type(module).__name__}); with "
                "expert_cache keep the router and all non-expert weights on the GPU (device_map value "
                "'cpu' only for the '...experts' modules, see hf_moe_opt.cache.offload_device_map)"
            )
    check_weight_dtypes(name, block)
    return hooked


def take_over_module(name: str, module: nn.Module) -> None:
    """Remove accelerate's hooks from ``module`` (and its children); offloaded parameters and
    buffers become the host tensors of the hook's weight map, which forgets them."""
    from accelerate.hooks import remove_hook_from_module

    for sub in [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]:
        maps = [h.weights_map for h in _hooks_of(sub) if getattr(h, "weights_map", None) is not None]
        remove_hook_from_module(sub)  # puts offloaded tensors back on their original (host) device
        for key, p in list(sub._parameters.items()) + list(sub._buffers.items()):
            if p is None:
                continue
            if p.device.type == "meta":
                value = None
                for wm in maps:
                    try:
                        value = wm[key]
                        break
                    except KeyError:
                        continue
                if value is None:
                    raise ValueError(f"{name}: the offloaded weight {key!r} of {type(sub).__name__} was not found")
                value = value.to("cpu")
                if key in sub._parameters:
                    sub._parameters[key] = nn.Parameter(value, requires_grad=p.requires_grad)
                else:
                    sub._buffers[key] = value
            for wm in maps:
                _forget(wm, key)
