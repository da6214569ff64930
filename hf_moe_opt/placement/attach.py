"""Glue between :func:`hf_moe_opt.optimize` and the placement stores.

``optimize(model, placement=plan)`` and ``optimize(model, expert_parallel=True, placement=plan)``
build every layer as usual, then hand it to a :class:`Placer`, which swaps the layer's resident
store for a :class:`PlacedExpertStore` (several devices, one process) or an
:class:`ExpertParallelStore` (one rank per plan device).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..devices import plain_device_hook, visible_gpus
from ..experts.layout import expert_layout, expert_modules
from .plan import PlacementPlan
from .store import PlacedExpertStore, ReplicaTable


def round_robin_plan(layers: dict[str, int], num_devices: int) -> PlacementPlan:
    """Expert ``j`` of every layer on device ``j % num_devices`` (the plan used when none is given)."""
    return PlacementPlan(
        num_devices=num_devices,
        strategy="round_robin",
        layers={name: [[(j % num_devices, 1.0)] for j in range(n)] for name, n in layers.items()},
    )


def _resolve_devices(devices: Sequence[Any] | None, plan: PlacementPlan) -> list[torch.device]:
    if devices is None:
        if visible_gpus() >= plan.num_devices:
            return [torch.device("cuda", i) for i in range(plan.num_devices)]
        raise ValueError(
            f"the placement plan spreads experts over {plan.num_devices} devices but only "
            f"{visible_gpus()} CUDA devices are visible; pass "
            "devices=[...] (one torch device per plan device, e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu'])"
        )
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices= takes one device per plan device (e.g. ['cuda:0', 'cuda:1']), got {devices!r}")
    out = []
    for d in devices:
        try:
            out.append(torch.device("cuda", d) if isinstance(d, int) else torch.device(d))
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"devices=: {d!r} is not a torch device ({err})") from None
    if any(d.type == "meta" for d in out):
        raise ValueError("devices=: the meta device holds no weights; name devices that can compute")
    visible = visible_gpus()
    missing = [str(d) for d in out if d.type == "cuda" and (d.index or 0) >= visible]
    if missing:
        raise ValueError(f"devices= names {missing}, but {visible} CUDA device(s) are visible here")
    if len(out) != plan.num_devices:
        raise ValueError(f"the placement plan has {plan.num_devices} devices; devices= lists {len(out)}")
    return out


def _check_plan_covers(placement: PlacementPlan, counts: dict[str, int]) -> None:
    missing = [n for n in counts if n not in placement.layers]
    if missing:
        raise ValueError(
            f"the placement plan has no entry for MoE layers {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
            f"it plans {placement.layer_names[:4]}{' ...' if len(placement.layers) > 4 else ''} "
            "(plan from a trace of this model: hf_moe_opt.profile)"
        )
    for name, n in counts.items():
        if placement.num_experts(name) != n:
            raise ValueError(f"layer {name!r} has {n} experts but the placement plan has {placement.num_experts(name)}")
    extra = [n for n in placement.layers if n not in counts]
    if extra:
        warnings.warn(
            f"the placement plan also places layers this model does not have: {extra[:4]}"
            f"{' ...' if len(extra) > 4 else ''} (a plan made for another model?); they are ignored",
            UserWarning,
            stacklevel=4,
        )


class Placer:
    """Checks the plan against the model's MoE blocks and installs the placement stores.

    Args:
        blocks: ``(name, block)`` for every sparse MoE block about to be optimized.
        placement: the plan (None with expert parallelism: round-robin over the ranks).
        expert_parallel: False, True (default process group) or a process group.
        devices: single process only: torch device of every plan device index.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        placement: PlacementPlan | None,
        expert_parallel: Any = False,
        devices: Sequence[Any] | None = None,
    ):
        self.expert_parallel = expert_parallel is not False and expert_parallel is not None
        counts: dict[str, int] = {}
        for name, block in blocks:
            layout = expert_layout(block)
            if layout is None:
                raise ValueError(
                    f"{name}: expert placement needs experts stored as separate modules (experts.expert_<j>) or "
                    "as fused [E, ...] tensors (experts.gate_up_proj or up_proj, and down_proj); "
                    f"{type(block).__name__} has neither"
                )
            counts[name] = layout.num_experts
        self.group = None
        if self.expert_parallel:
            from .expert_parallel import resolve_group

            self.group = resolve_group(expert_parallel)
            import torch.distributed as dist

            if placement is None:
                placement = round_robin_plan(counts, dist.get_world_size(self.group))
            if devices is not None:
                raise ValueError(
                    "devices= is for single-process placement; with expert_parallel each rank uses its own device"
                )
        if placement is None:
            raise ValueError("placement=None: pass a PlacementPlan (hf_moe_opt.plan_placement)")
        if not isinstance(placement, PlacementPlan):
            raise TypeError(f"placement must be a PlacementPlan, got {type(placement).__name__}")
        # With expert parallelism a local problem is reported after the ranks compared notes, so
        # every rank raises instead of the others waiting for it.
        self.local_error: str | None = None
        try:
            _check_plan_covers(placement, counts)
        except ValueError as exc:
            if not self.expert_parallel:
                raise
            self.local_error = str(exc)
        self.plan = placement
        self.devices = None if self.expert_parallel else _resolve_devices(devices, placement)
        self.pending: list[tuple[str, nn.Module]] = []

    def check_block(self, name: str, block: nn.Module) -> None:
        """Validate a block's weights; drop accelerate's device-moving hooks from its experts.

        A model loaded with :meth:`PlacementPlan.device_map` carries accelerate hooks that move inputs
        to every expert module's device; the placement store moves the rows itself, so those hooks go.
        Fused experts, which that map keeps in host memory, may be offloaded by accelerate (weights in
        its host-side map, parameters on the meta device): they are taken over as host tensors, as
        the expert cache does. Other offload hooks are refused.
        """
        from ..api import SUPPORTED_DTYPES

        experts = getattr(block, "experts", None)
        fused = experts is not None and not expert_modules(block)
        # Fused experts' hooks (offload included) are taken over in before_build, once every block passed.
        skip = {id(m) for m in experts.modules()} if fused else set()
        for module in block.modules():
            hook = getattr(module, "_hf_hook", None)
            if id(module) not in skip and hook is not None and not plain_device_hook(hook):
                raise ValueError(
                    f"{name} carries accelerate offload hooks; expert placement needs every expert's weights "
                    "on a real device (no disk/CPU offload in the device map, except for fused experts)"
                )
        from accelerate.hooks import remove_hook_from_module

        for expert_name in expert_modules(block):
            remove_hook_from_module(experts.get_submodule(expert_name), recurse=True)
        offloaded = fused and getattr(experts, "_hf_hook", None) is not None
        for pname, p in block.named_parameters():
            if p.device.type == "meta" and not (offloaded and pname.startswith("experts.")):
                raise ValueError(f"{name}.{pname} is on the meta device; load the weights before optimizing")
            if p.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}.{pname} has dtype {p.dtype}; quantized experts are not supported")

    @torch.no_grad()
    def before_build(self, name: str, block: nn.Module) -> None:
        """Bring a layer's experts onto one device (the router's) so the layer can be built.

        Fused experts stay in one tensor wherever they are; accelerate hooks on them are removed and
        offloaded ones become host tensors. Per-expert modules found elsewhere move (a model loaded
        with the plan's device map); the placement store moves them to their planned devices right
        after, so the peak is one layer's experts.
        """
        experts = getattr(block, "experts", None)
        if experts is not None and not expert_modules(block) and getattr(experts, "_hf_hook", None) is not None:
            from ..cache.offload import take_over_module

            take_over_module(name, experts)  # fused experts: host tensors, whatever accelerate did with them
        router_param = next(iter(block.router.parameters()), None) if hasattr(block, "router") else None
        params = [p for n in expert_modules(block) for p in block.experts.get_submodule(n).parameters()]
        if not params:
            return
        target = router_param.device if router_param is not None else params[0].device
        for p in params:
            if p.device != target:
                p.data = p.data.to(target)

    def after_build(self, name: str, layer: nn.Module) -> None:
        """Single process: place the layer's experts now. Expert parallel: wait for :meth:`finish`."""
        if self.expert_parallel:
            self.pending.append((name, layer))
            return
        table = ReplicaTable(self.plan, name, layer.num_experts)
        layer.store = PlacedExpertStore(layer.weights, table, self.devices)
        layer._resolved.clear()

    def finish(self) -> None:
        """Expert parallel: check that every rank agrees, then shard the experts."""
        if not self.expert_parallel:
            return
        from .expert_parallel import ExpertParallelStore, check_ranks_agree, layer_signature, plan_digest

        signature = {
            "layers": [layer_signature(name, layer.weights, layer.family) for name, layer in self.pending],
            # What is placed where (metadata may differ between ranks' plans).
            "plan": plan_digest(
                json.dumps([self.plan.num_devices, sorted(self.plan.to_dict()["layers"], key=lambda e: e["name"])])
            ),
            "plan_devices": self.plan.num_devices,
            "local_error": self.local_error,
        }
        check_ranks_agree(signature, self.group)
        if self.local_error is not None:
            raise ValueError(self.local_error)
        for name, layer in self.pending:
            table = ReplicaTable(self.plan, name, layer.num_experts)
            store = ExpertParallelStore(layer.weights, table, self.group, name)
            store.track_dtype(layer)
            keep = set(table.experts_on[store.rank])
            for expert_name in expert_modules(layer):
                if int(expert_name.split("_", 1)[1]) not in keep:
                    delattr(layer.experts, expert_name)
            layer.store = store
            layer._hf_moe_opt_expert_parallel = True
            layer._resolved.clear()
        self.pending.clear()
