"""The public entry points: optimize, restore, is_optimized, supported_architectures."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import logging

from . import dense, encoder_graphs, step_graphs
from .cache.policies import DEFAULT_POLICY
from .dense import DENSE_MODEL_TYPES
from .devices import plain_device_hook
from .experts.backends import BACKENDS
from .graphs import GraphCache
from .layer import CAPACITY_MODES, OptimizedMoE, remove_expert_load_hooks

logger = logging.get_logger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_GRAPH_MODES = (False, True, "step", "encoder")
# Modes that may be asked for together (a sequence): they wrap different calls (generate, the encoder).
_COMBINABLE_GRAPH_MODES = ("encoder", "step")


def _choice(name: str, value, choices) -> str:
    """A string option, case and surrounding spaces ignored (``"Triton"`` is ``"triton"``), else a
    ValueError naming the choices. Every string option of ``optimize`` reads this way."""
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def _graph_modes(cuda_graphs) -> frozenset:
    """``cuda_graphs`` as a set of modes: ``{True}``, ``{"step"}``, ``{"encoder", "step"}``, ... (empty: none)."""
    unknown = f"unknown cuda_graphs {cuda_graphs!r}; choose False, True, 'step', 'encoder' or ('encoder', 'step')"
    if isinstance(cuda_graphs, str):
        cuda_graphs = cuda_graphs.strip().lower()
    if isinstance(cuda_graphs, (bool, str)):
        if cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(unknown)
        return frozenset() if cuda_graphs is False else frozenset([cuda_graphs])
    if isinstance(cuda_graphs, (list, tuple, set, frozenset)):
        modes = frozenset(m.strip().lower() if isinstance(m, str) else m for m in cuda_graphs)
        if any(not isinstance(m, str) or m not in _COMBINABLE_GRAPH_MODES for m in modes):
            raise ValueError(
                f"cuda_graphs {cuda_graphs!r}: a sequence may combine only 'encoder' and 'step' (per-layer graphs, "
                "True, run inside those captures and cannot be combined with them)"
            )
        return modes
    raise ValueError(unknown)


def _patches():
    from .patches import registered_patches

    return registered_patches()


def supported_architectures() -> dict[str, str]:
    """``{config.model_type: sparse MoE block class name}`` for every architecture ``optimize`` has a
    patch for. The installed transformers may lack some of them, or have one in an older form that is
    not matched (Jamba, Aria and LongCat-Flash in transformers 5.17): ``optimize`` and
    :func:`check_support` name such blocks as unsupported."""
    return {p.model_type: p.block_class_name for p in _patches()}


def _find_blocks(model: nn.Module):
    from .patches import find_patch

    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            patch = find_patch(child)
            if patch is not None:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((name, parent, child_name, child, patch))
    return found


def _config_for(model: nn.Module, block_name: str):
    config = getattr(model, "config", None)
    # A wrapper around a transformers model: the config of the innermost module above the block.
    parts = block_name.split(".")[:-1]
    while config is None and parts:
        holder = model.get_submodule(".".join(parts))
        config = getattr(holder, "config", None)
        parts.pop()
    if config is None:
        raise ValueError(f"cannot optimize {block_name}: the model has no `config` (pass a transformers model)")
    return config


def _check_block_weights(name: str, block: nn.Module, cached: bool) -> None:
    hooks = [getattr(m, "_hf_hook", None) for m in block.modules()]
    if any(h is not None and not plain_device_hook(h) for h in hooks):
        raise ValueError(
            f"{name} has weights offloaded by accelerate (a device map with 'cpu' or 'disk' entries): "
            "optimize(model, expert_cache=...) serves offloaded experts from host memory; otherwise load "
            "the model onto GPUs"
        )
    for pname, p in block.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"{name}.{pname} is on the meta device (not loaded, or offloaded by accelerate). "
                "Load the model's weights onto a real device before hf_moe_opt.optimize."
            )
    check_weight_dtypes(name, block)
    devices = sorted({str(p.device) for p in block.parameters()})
    if len(devices) > 1 and not cached:  # a cache's experts live in host memory
        raise ValueError(
            f"{name} has weights on {devices}: a layer runs on one device; load each MoE block onto one "
            "device, or spread experts with placement= (hf_moe_opt.plan_placement)"
        )


def check_weight_dtypes(name: str, block: nn.Module) -> None:
    """Every weight of ``block`` in a dtype the layers compute in (meta parameters carry theirs too)."""
    for pname, p in block.named_parameters():
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}.{pname} has dtype {p.dtype}; hf_moe_opt supports float32, bfloat16 and float16 "
                "experts (quantized experts are not supported)"
            )


def _quietly(check: Callable[[], Any]) -> bool:
    """``check()``, False where it raises (a probe for an error message must not fail itself)."""
    try:
        return bool(check())
    except Exception:  # noqa: BLE001
        return False


def optimize(
    model: nn.Module,
    *,
    capacity: str = "model",
    backend: str = "auto",
    cuda_graphs: bool | str | tuple[str, ...] = False,
    placement=None,
    expert_parallel=False,
    devices=None,
    expert_cache=None,
    cache_policy: str = "changepoint",
    pinned_experts=None,
    cache_policy_options: dict | None = None,
    cache_prefetch: bool = False,
    cache_misses: str = "copy",
    fuse_dense: bool = False,
) -> nn.Module:
    """Replace every supported sparse MoE block of ``model`` in place with :class:`OptimizedMoE`.

    String options ignore case and surrounding spaces (``backend="Triton"`` is ``"triton"``).

    Args:
        model: a transformers model in eval mode: Switch Transformers, NLLB-MoE, or a family with fused
            expert tensors (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS; shared experts stay
            dense and resident). See ``hf_moe_opt.supported_architectures()``.
        capacity: ``"model"`` reproduces the model's routing exactly, capacity drops included
            (NLLB-MoE with the correct semantics, not transformers 5.x's); ``"none"`` never drops
            a token (dynamic gating).
        backend: expert compute: ``"torch"`` (grouped GEMMs), ``"triton"`` (fused kernels, CUDA)
            or ``"auto"``: on CUDA, per call, whichever of the two this GPU's tuned launch table
            measured faster for the expert shape and token count (Triton up to 4096 routed rows
            where the table has no timings); elsewhere ``"torch"``.
        cuda_graphs: on CUDA, ``True`` replays each layer's dispatch + experts + combine from a CUDA
            graph captured per input shape (up to 1024 routed rows, 16 shapes per layer): the MoE part
            of a decode step costs one graph launch instead of dozens of kernel launches.
            ``"step"`` captures whole decode steps instead: ``model.generate`` then runs with a static
            KV cache, and every one-token step (all layers, attention, MoE layers, LM head) is
            replayed from one CUDA graph per batch size and length bucket (the prefill stays eager).
            Greedy, sampling and beam search give the tokens of plain ``generate``; assisted or
            chunked-prefill generation, a cache passed in, and non-CUDA devices run plain ``generate``
            with a warning. Switch Transformers and the causal families without sliding-window
            layers, and NLLB-MoE with transformers >= 5.24; NLLB-MoE on older versions and GPT-OSS raise
            ``ValueError`` (see :mod:`hf_moe_opt.step_graphs`).
            Resident experts, or an ``expert_cache`` with ``cache_misses="read"`` (at most 8 sequences per
            step, beams counted: the caches' policies run between the replays). ``"encoder"`` replays an encoder-decoder
            model's encoder forward (also the encoder pass of ``generate``) from one CUDA graph per input
            signature, under ``torch.no_grad()``; other calls run eagerly (see :mod:`hf_moe_opt.encoder_graphs`).
            ``("encoder", "step")`` does both: a sequence-to-sequence ``generate`` then replays its
            encoder pass and every decode step.
        placement: a :class:`~hf_moe_opt.placement.PlacementPlan` (``hf_moe_opt.plan_placement``):
            spread each layer's experts over several devices of this process; tokens go to their
            expert's device and come back (load balancing). ``devices`` gives the torch device of
            every plan device (default ``cuda:0 .. cuda:{D-1}``).
        expert_parallel: ``True`` (or a process group): under ``torchrun``, rank ``r`` keeps only the
            experts ``placement`` puts on device ``r`` (round-robin when no plan is given) and the
            layers exchange tokens with all-to-alls. Every rank must call the model the same number
            of times; the other experts' parameters are freed (see ``hf_moe_opt.placement.expert_parallel``).
        devices: torch devices for ``placement`` in one process, e.g. ``["cuda:0", "cuda:1"]``.
        expert_cache: expert buffering: keep every expert in pinned host memory (one copy) and only
            some on the compute device, in slots. An ``int`` (experts per layer), a ``float`` in
            ``(0, 1]`` (fraction of each layer's experts, rounded down, at least one), a byte budget
            shared by all layers (``"24GiB"``, ``"500MB"``; split evenly, or by measured routing
            demand with ``hf_moe_opt.cache.CacheBudget(budget, demand=trace)``). Each layer computes
            on the device of its router (the dense weights stay where they are); the experts move to
            (or stay in) host memory. For models larger than the GPU, load with
            ``device_map=hf_moe_opt.cache.offload_device_map(model)`` (accelerate's offload hooks on
            the experts are taken over, no second copy) or load on the CPU and call
            ``hf_moe_opt.cache.move_dense(model, "cuda")`` first (a layer left computing on the CPU
            while CUDA is available gets a cache that serves the CPU, with a ``RuntimeWarning``).
            See ``hf_moe_opt.stats(model)``.
        cache_policy: the eviction policy, one of ``hf_moe_opt.cache.POLICY_NAMES``: ``"changepoint"``
            (the default: LFU over a Bayesian mixture of when the routing popularity last changed),
            ``"adaptive"`` (LFU since the last detected change), ``"lifo"`` (the paper's), ``"fifo"``,
            ``"lru"``, ``"lfu"``, ``"lfru"``.
        pinned_experts: experts never evicted: ``{layer name: [expert ids]}`` or one list for every layer.
        cache_policy_options: keyword options of the policy (e.g. ``{"half_life": 32}`` for ``"lfru"``;
            see each policy class in ``hf_moe_opt.cache.policies``); unknown ones raise ``ValueError``.
        cache_prefetch: look-ahead: while a cached layer computes a decode step, it predicts the next
            cached layer's experts (that layer's router applied to this layer's input) and starts
            their copies, so that they overlap with the compute in between. Outputs never change; a
            wrong guess costs a copy. ``stats`` reports ``prefetched`` and ``prefetch_hits``.
        cache_misses: what a cached one-token step does with an expert not in a slot. ``"copy"``
            (default): read the router's choices on the host, copy the expert in and wait for it.
            ``"read"``: the decode kernels read it straight from pinned host memory (Triton backend:
            CUDA, or ``TRITON_INTERPRET=1``), the step never waits for the host, and the policy runs one
            step behind, copying experts into slots for later steps; other calls copy as before.
            Outputs are the same either way; ``stats`` reports ``host_reads`` (assignments computed from
            host memory). Needs pinned memory; not with ``cache_prefetch``; layers on the torch backend
            copy their misses as ``"copy"`` does (with a ``RuntimeWarning``). See
            ``hf_moe_opt.cache.host_reads``.
        fuse_dense: also speed up the dense parts (Switch Transformers, NLLB-MoE): attention runs as one
            ``scaled_dot_product_attention`` call with the position bias and mask folded into one
            additive mask, and Switch's float32 RMS norms as one-pass kernels (CUDA). Outputs agree
            with the eager modules to rounding, not bit for bit (see ``hf_moe_opt.dense``);
            ``restore`` undoes it. Other families raise ``ValueError``: load them with
            ``attn_implementation="sdpa"``.

    Returns:
        ``model``, modified in place. Parameter names and values are unchanged.
    """
    capacity = _choice("capacity", capacity, CAPACITY_MODES)
    backend = _choice("backend", backend, BACKENDS)
    if isinstance(cache_misses, str):
        cache_misses = cache_misses.strip().lower()  # checked with the other cache options
    graph_modes = _graph_modes(cuda_graphs)
    module_argument(model, "optimize")
    if is_optimized(model):
        raise ValueError("this model is already optimized; call hf_moe_opt.restore(model) before optimizing again")
    blocks = _find_blocks(model)
    if not blocks:
        from .patches import find_patch, unmatched_moe_blocks

        if find_patch(model) is not None:
            raise ValueError(
                f"{type(model).__name__} is itself a sparse MoE block: pass the whole transformers model "
                "(the one with a .config), whose blocks optimize replaces in place"
            )
        supported = ", ".join(f"{cls} ({mt})" for mt, cls in supported_architectures().items())
        hint = ""
        can_set = getattr(model, "_can_set_experts_implementation", None)
        if callable(can_set) and _quietly(can_set):
            # Its experts modules take transformers' experts implementations: ours runs them there.
            hint = (
                "; its experts accept experts implementations: hf_moe_opt.register_experts_implementation(), "
                'then from_pretrained(..., experts_implementation="hf_moe_opt") or '
                'model.set_experts_implementation("hf_moe_opt")'
            )
        unmatched = unmatched_moe_blocks(model)
        subclassed = [f"{name} ({why})" for name, why in unmatched if "subclasses" in why]
        if subclassed:
            raise ValueError(
                f"{type(model).__name__} has no supported sparse MoE block; these subclass one and are not "
                f"replaced (a subclass may change the forward): {'; '.join(subclassed)}"
            )
        changed = [f"{name} ({why})" for name, why in unmatched if "is not matched" in why]
        if changed:
            raise ValueError(
                f"{type(model).__name__} has no supported sparse MoE block; the installed transformers "
                f"{transformers.__version__} changed code its family shares with another: {'; '.join(changed[:2])}"
            )
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        block_class = supported_architectures().get(model_type)
        if block_class is not None:
            # A supported family whose config builds no sparse layer (e.g. Switch Transformers with more
            # num_sparse_encoder_layers than num_layers, which sets encoder_sparse_step to 0).
            raise ValueError(
                f"{type(model).__name__} ({model_type}) is a supported family, but this model has no "
                f"{block_class}: its config builds no sparse MoE layer (check the config's sparse-layer "
                "settings, e.g. num_sparse_encoder_layers / num_sparse_decoder_layers for Switch Transformers)"
            )
        raise ValueError(f"{type(model).__name__} has no supported sparse MoE block{hint}. Supported: {supported}")
    if not isinstance(fuse_dense, bool):
        raise TypeError(f"fuse_dense must be True or False, got {fuse_dense!r}")
    if fuse_dense and getattr(getattr(model, "config", None), "model_type", None) not in DENSE_MODEL_TYPES:
        raise ValueError(
            "fuse_dense=True applies to Switch Transformers and NLLB-MoE; load other models with "
            'attn_implementation="sdpa" (transformers\' own fused attention)'
        )
    for mode in sorted(graph_modes & set(_COMBINABLE_GRAPH_MODES)):
        # Read-behind caches never read the host inside a one-token step: whole decode steps can be graphed.
        read_behind_steps = mode == "step" and expert_cache is not None and cache_misses == "read"
        if placement is not None or expert_parallel or (expert_cache is not None and not read_behind_steps):
            raise ValueError(
                f'cuda_graphs="{mode}" needs resident experts: it cannot be combined with expert_cache= (except '
                'cuda_graphs="step" with cache_misses="read"), placement= or expert_parallel='
            )
    if "encoder" in graph_modes:
        encoder_graphs.check_supported(model)  # checked again once the layers are built
    if "step" in graph_modes:
        step_graphs.check_supported(model)
    placer = None
    if placement is not None or expert_parallel:
        from .placement.attach import Placer

        placer = Placer([(b[0], b[3]) for b in blocks], placement, expert_parallel, devices)
    elif devices is not None:
        raise ValueError("devices= needs placement= (a PlacementPlan)")
    cache_plan = None
    if expert_cache is not None:
        if placer is not None:
            raise ValueError("expert_cache= cannot be combined with placement=/expert_parallel= yet")
        from .cache.setup import plan_expert_cache

        cache_plan = plan_expert_cache(
            [(b[0], b[3]) for b in blocks],
            expert_cache,
            cache_policy,
            pinned_experts,
            policy_options=cache_policy_options,
            prefetch=cache_prefetch,
            misses=cache_misses,
        )
    elif (
        pinned_experts is not None
        or str(cache_policy).strip().lower() != DEFAULT_POLICY
        or cache_policy_options is not None
        or cache_prefetch is not False
        or cache_misses != "copy"
    ):
        raise ValueError(
            "cache_policy=, cache_policy_options=, pinned_experts=, cache_prefetch= and cache_misses= take effect "
            "only with expert_cache="
        )
    for name, _, _, block, _ in blocks:
        if placer is None:
            _check_block_weights(name, block, cached=cache_plan is not None)
        else:
            placer.check_block(name, block)
    from .patches.base import undo_router_swap

    try:
        for name, parent, child_name, block, patch in blocks:
            if placer is not None:
                placer.before_build(name, block)
            try:
                layer = patch.build(block, _config_for(model, name), capacity=capacity, backend=backend)
            except BaseException:
                undo_router_swap(block)  # the build may have swapped the router's class before failing
                raise
            layer._hf_moe_opt_patch = patch
            if True in graph_modes:
                layer.graphs = GraphCache()
            # Installed before the experts are placed: a failure there is rolled back with the rest.
            setattr(parent, child_name, layer)
            if placer is not None:
                placer.after_build(name, layer)
        if placer is not None:
            placer.finish()
        if cache_plan is not None:
            cache_plan.attach([(b[0], getattr(b[1], b[2])) for b in blocks])
        if fuse_dense:
            dense.fuse_dense(model)
        if "step" in graph_modes:
            step_graphs.attach(model)
        if "encoder" in graph_modes:
            encoder_graphs.attach(model)
    except BaseException:
        # All or nothing: a model left half optimized (or with swapped routers) would be unusable.
        _restore(model, rolling_back=True)
        raise
    logger.info(f"hf_moe_opt: optimized {len(blocks)} MoE blocks (capacity={capacity}, backend={backend})")
    from .patches import unmatched_moe_blocks

    left = unmatched_moe_blocks(model)
    if left:
        listed = "; ".join(f"{name} ({why})" for name, why in left[:8]) + ("; ..." if len(left) > 8 else "")
        warnings.warn(
            f"hf_moe_opt: optimized {len(blocks)} MoE blocks and left {len(left)} module(s) that look like sparse MoE "
            f"blocks as they are: {listed}",
            stacklevel=2,
        )
    return model


def module_argument(model: object, caller: str) -> nn.Module:
    """``model``, or a TypeError naming ``caller`` where it is not a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    return model


def optimized_layers(model: nn.Module) -> list[tuple[str, OptimizedMoE]]:
    """``(name, layer)`` for every optimized layer of ``model``."""
    module_argument(model, "optimized_layers")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OptimizedMoE)]


def is_optimized(model: nn.Module) -> bool:
    """Whether ``model`` holds optimized MoE layers."""
    module_argument(model, "is_optimized")
    return any(isinstance(m, OptimizedMoE) for m in model.modules())


def restore(model: nn.Module) -> nn.Module:
    """Put the original HF blocks back (same weights); returns ``model``."""
    module_argument(model, "restore")
    return _restore(model)


def _restore(model: nn.Module, rolling_back: bool = False) -> nn.Module:
    """:func:`restore`; ``rolling_back``: undo a failed :func:`optimize` (whatever it had built)."""
    targets = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, OptimizedMoE):
                targets.append((parent, child_name, child))
    if not targets and not rolling_back:
        raise ValueError("this model is not optimized (no hf_moe_opt layers found)")
    if not rolling_back and any(getattr(layer, "_hf_moe_opt_expert_parallel", False) for _, _, layer in targets):
        raise ValueError("an expert-parallel model holds only this rank's experts and cannot be restored; reload it")
    step_graphs.detach(model)
    encoder_graphs.detach(model)
    dense.unfuse_dense(model)
    for parent, child_name, layer in targets:
        if hasattr(layer.store, "release"):
            layer.store.release()  # expert cache: free the slots, experts back to their original device
        remove_expert_load_hooks(layer)
        block = layer._hf_moe_opt_patch.restore(layer)
        block.train(layer.training)  # hidden from model.train()/eval() while optimized (Mixtral's jitter reads it)
        setattr(parent, child_name, block)
    return model


def stats(model: nn.Module) -> dict[str, dict]:
    """Per optimized layer, its expert store's counters: ``{layer name: {...}}``.

    With ``expert_cache``: ``hits``, ``misses``, ``hit_rate``, ``bytes_copied``, ``copy_time_ms``,
    ``stall_time_ms`` (compute waiting for copies), ``host_time_ms`` (the cache's calls on the host),
    ``resident`` (expert ids on the device now) and more (see
    :meth:`hf_moe_opt.cache.CachedExpertStore.stats`). Layers without a cache give ``{}``. Reading
    CUDA timings waits for the copies recorded so far.
    """
    layers = optimized_layers(module_argument(model, "stats"))
    if not layers:
        raise ValueError("this model is not optimized (no hf_moe_opt layers found)")
    return {name: layer.store.stats() for name, layer in layers}


def sync_expert_copies(model: nn.Module) -> None:
    """Take fresh copies of expert and router weights that were written in place by other means than
    ``load_state_dict``.

    The expert cache's device slots and a placement's per-device copies (slices of fused expert
    tensors, replicas) are copies of the expert parameters. ``load_state_dict`` (on the model, a
    layer or its expert modules) refreshes them by itself; after writing expert parameters in place
    any other way (``p.data.mul_(...)``, ``p.copy_(...)``), call this before the next forward. The
    float32 copy of a half-precision Switch / NLLB-MoE router weight is cast again here too (in-place
    writes through the parameter itself are followed without it; writes through ``.data`` are not).
    Per-expert parameters re-pointed one by one (``p.data = new_tensor``, as accelerate's
    ``set_module_tensor_to_device`` does) are gathered into the layer's stacked experts again, with or
    without a cache.

    Raises:
        ValueError: ``model`` is not optimized.
    """
    layers = optimized_layers(module_argument(model, "sync_expert_copies"))
    if not layers:
        raise ValueError("this model is not optimized (no hf_moe_opt layers found)")
    for _, layer in layers:
        layer.expert_weights_changed()


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of every optimized layer's store (cached experts stay resident)."""
    layers = optimized_layers(module_argument(model, "reset_stats"))
    if not layers:
        raise ValueError("this model is not optimized (no hf_moe_opt layers found)")
    for _, layer in layers:
        reset = getattr(layer.store, "reset_stats", None)
        if reset is not None:
            reset()
