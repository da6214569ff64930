"""Expert stores that follow a placement plan: several devices in one process, or several processes.

Both stores take the layer's dispatch plan (assignments sorted by expert) and give every kept
assignment a *target*: the device (or rank) holding the copy of its expert that computes it. A
replicated expert's assignments are split between its copies in proportion to the plan's shares,
as contiguous runs of the expert's sorted group (earlier tokens go to the first replica), so the
split is deterministic. Each target computes its rows with the layer's expert backend over a
sub-plan of local experts; the results come back to the layer's device and are combined there in
the same order and with the same rounding as :func:`hf_moe_opt.experts.torch_backend.torch_moe_ffn`
(on CUDA the top-k slots are summed by the Triton backend's slot sum, fp32 in slot order).

:class:`PlacedExpertStore`
    One process, several devices (``optimize(model, placement=plan)``). Per device one stacked
    tensor of the experts placed there; each expert's parameters are views of its home device's
    stack (one copy of every weight; a replica on another device is an extra copy). Fused
    ``[E, ...]`` parameters (Mixtral, Qwen, DeepSeek, GPT-OSS, ...) cannot be split over devices:
    each device gets a *copy* of its experts' slices, and the parameter itself, the ``state_dict``
    copy, moves to host memory (so no accelerator holds experts that are not placed on it). Rows go to
    the devices with non-blocking copies and every device's work is queued before anything is
    read back, so the devices compute concurrently (CUDA runs each device's queue on its own).
:class:`ExpertParallelStore`
    One process per device (``optimize(model, expert_parallel=True, placement=plan)`` under
    ``torchrun``): rank ``r`` keeps only the experts the plan puts on device ``r``. Per layer call
    one ``all_to_all_single`` exchanges the per-expert row counts, then two variable-size
    ``all_to_all_single`` calls send the rows to the experts' ranks and the outputs back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..compiled_kernels import compiled_kernels
from ..dispatch import DispatchPlan
from ..experts.activation import Activation
from ..experts.store import ExpertStore, FfnFactory
from ..experts.weights import ExpertStack, ExpertWeights, FusedExpertTensor
from .plan import PlacementPlan


class ReplicaTable:
    """One layer's placement as tensors: replica devices, cumulative shares, local expert slots.

    Attributes:
        num_devices: ``D``; ``num_experts``: ``E``.
        experts_on: per device, the global experts with a copy there, ascending.
        home: per expert, the device of its first replica.
    """

    def __init__(self, plan: PlacementPlan, layer: str, num_experts: int):
        if plan.num_experts(layer) != num_experts:
            raise ValueError(
                f"layer {layer!r} has {num_experts} experts but the placement plan has {plan.num_experts(layer)}"
            )
        self.layer = layer
        self.num_devices = plan.num_devices
        self.num_experts = num_experts
        reps = [plan.replicas(layer, e) for e in range(num_experts)]
        width = max(len(r) for r in reps)
        dev = torch.zeros(num_experts, width, dtype=torch.int64)
        cum = torch.ones(num_experts, width, dtype=torch.float64)
        for e, r in enumerate(reps):
            total = 0.0
            for i in range(width):
                d, s = r[min(i, len(r) - 1)]
                if i < len(r):
                    total += s
                dev[e, i] = d
                cum[e, i] = total if i < len(r) - 1 else 2.0  # the last replica takes the remainder
        self.replica_device = dev
        self.replica_cum = cum
        self.home = [r[0][0] for r in reps]
        self.experts_on = [plan.experts_on(layer, d) for d in range(self.num_devices)]
        local = torch.full((self.num_devices, num_experts + 1), -1, dtype=torch.int64)
        for d, experts in enumerate(self.experts_on):
            for i, e in enumerate(experts):
                local[d, e] = i
        self.local_index = local
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(replica_device, replica_cum, local_index)`` on ``device`` (cached)."""
        got = self._cache.get(device)
        if got is None:
            got = (
                self.replica_device.to(device),
                self.replica_cum.to(device),
                self.local_index.to(device),
            )
            self._cache[device] = got
        return got

    def targets(self, plan: DispatchPlan) -> torch.Tensor:
        """``[A]`` int64 target device of every sorted row of ``plan``; ``num_devices`` for dropped rows.

        Replica ``i`` of expert ``e`` takes the rows at positions ``[round(c_{i-1} n), round(c_i n))``
        of the expert's group of ``n`` rows, ``c_i`` the cumulative shares. No host synchronisation.
        """
        rep_dev, rep_cum, _ = self.tensors(plan.expert.device)
        kept = plan.kept_rows()
        expert = plan.expert.clamp(max=self.num_experts - 1)
        if rep_dev.shape[1] == 1:
            target = rep_dev[expert, 0]
        else:
            counts = plan.counts.to(torch.int64)
            starts = plan.offsets.to(torch.int64) - counts
            pos = torch.arange(plan.num_rows, device=expert.device) - starts[expert]
            bounds = torch.floor(rep_cum[expert] * counts[expert, None].to(torch.float64) + 0.5)
            which = (pos[:, None].to(torch.float64) >= bounds).sum(dim=1).clamp(max=rep_dev.shape[1] - 1)
            target = rep_dev[expert].gather(1, which[:, None]).squeeze(1)
        return torch.where(kept, target, self.num_devices)


def _sub_plan(local: torch.Tensor, gate: torch.Tensor, num_local: int) -> DispatchPlan:
    """A top-1 plan over rows already sorted by local expert ``local`` (every row kept)."""
    rows = local.shape[0]
    hist = torch.zeros(num_local, dtype=torch.int32, device=local.device)
    hist.scatter_add_(0, local, torch.ones_like(local, dtype=torch.int32))
    ar = torch.arange(rows, device=local.device)
    return DispatchPlan(
        order=ar,
        token=ar,
        expert=local,
        counts=hist,
        offsets=torch.cumsum(hist, 0, dtype=torch.int32),
        gate=gate,
        num_tokens=rows,
        top_k=1,
        num_experts=num_local,
        may_drop=False,
    )


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation of ``range(n)``: a scatter of ``n`` ints on the device, no host sync."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


@functools.cache
def _triton_slot_sum():
    """:func:`hf_moe_opt.kernels.moe_ffn.slot_sum` (the Triton backend's combine) if Triton compiles, else None."""
    module = compiled_kernels("moe_ffn")
    return None if module is None else module.slot_sum


def _sum_slots(slots: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """``out[t] = sum_j slots[t * top_k + j]`` in fp32, rounded once: Triton on CUDA, ``torch.sum`` elsewhere.

    ``torch.sum`` over the strided slot dim is slow on CUDA (see ``slot_sum``); float64 stays on torch,
    as the kernel accumulates in fp32.
    """
    if slots.is_cuda and slots.dtype in (torch.float32, torch.float16, torch.bfloat16):
        slot_sum = _triton_slot_sum()
        if slot_sum is not None:
            out = torch.empty((num_tokens, slots.shape[1]), dtype=slots.dtype, device=slots.device)
            with torch.cuda.device(slots.device):  # Triton launches on the current device
                return slot_sum(slots, top_k, out)
    return slots.view(num_tokens, top_k, slots.shape[1]).sum(dim=1)  # not -1: num_tokens may be 0


def _combine(rows: torch.Tensor, slot: torch.Tensor, plan: DispatchPlan, x_dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's slots of ``[A, D]`` per-row outputs, row ``i`` holding assignment ``slot[i]``.

    ``slot`` is a permutation of ``range(A)`` (dropped rows zero), so the unsort is a gather of rows
    by its inverse rather than a scatter of rows.
    """
    slots = rows.index_select(0, _inverse(slot)).to(x_dtype)
    if plan.top_k == 1:
        return slots
    return _sum_slots(slots, plan.num_tokens, plan.top_k)


def _stack_names(weights: ExpertWeights) -> list[str]:
    return [n for n in ("w1", "b1", "w2", "b2") if getattr(weights, n) is not None]


def _meta_placeholder(stack: ExpertStack, num_experts: int) -> torch.Tensor:
    """A no-memory ``[E, *shape]`` tensor so shape queries on the layer's weights keep working."""
    first = stack.params[0]
    return torch.empty((num_experts, *first.shape), dtype=first.dtype, device="meta")


class _DeviceExperts:
    """The stacked weights of the experts held on one device: ``{"w1": [n, F, D], ...}``."""

    def __init__(self, device: torch.device, experts: list[int]):
        self.device = device
        self.experts = experts
        self.tensors: dict[str, torch.Tensor] = {}

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        t = self.tensors
        return t["w1"], t.get("b1"), t["w2"], t.get("b2")


@torch.no_grad()
def _copy_fused_slices(name: str, stack: FusedExpertTensor, groups: Sequence[_DeviceExperts]) -> None:
    """Each group gets a copy of its experts' slices of a fused parameter, in the parameter's layout."""
    source = stack.storage()
    for group in groups:
        if not group.experts:
            group.tensors.pop(name, None)
            continue
        index = torch.tensor(group.experts, dtype=torch.long, device=source.device)
        group.tensors[name] = stack.compute_view(source.index_select(0, index).to(group.device))


@torch.no_grad()
def _place_stacks(weights: ExpertWeights, groups: Sequence[_DeviceExperts], home: Sequence[int] | None) -> None:
    """Stack each group's experts on its device; re-point parameter ``e`` at its home group's slice.

    ``home[e]`` is the index of the group whose slice becomes expert ``e``'s parameter (None: every
    group that holds ``e`` is its only holder, as in expert parallelism where one group exists).
    """
    for name in _stack_names(weights):
        stack = getattr(weights, name)
        if isinstance(stack, FusedExpertTensor):
            _copy_fused_slices(name, stack, groups)
            continue
        params = stack.params
        for g, group in enumerate(groups):
            if not group.experts:
                group.tensors.pop(name, None)
                continue
            first = params[group.experts[0]]
            new = torch.empty((len(group.experts), *first.shape), dtype=first.dtype, device=group.device)
            for i, e in enumerate(group.experts):
                new[i].copy_(params[e].data)
            for i, e in enumerate(group.experts):
                if home is None or home[e] == g:
                    params[e].data = new[i]
            group.tensors[name] = new


class PlacedExpertStore(ExpertStore):
    """Experts spread over several devices of one process by a :class:`PlacementPlan`.

    Args:
        weights: the layer's stacked weights (one device); re-stacked here per device.
        table: the layer's placement.
        devices: the torch device of each plan device index.
    """

    def __init__(self, weights: ExpertWeights, table: ReplicaTable, devices: Sequence[torch.device]):
        super().__init__(weights)
        if len(devices) != table.num_devices:
            raise ValueError(f"the plan has {table.num_devices} devices but {len(devices)} torch devices were given")
        self.table = table
        self.devices = [torch.device(d) for d in devices]
        self.num_experts = table.num_experts
        self.groups = [_DeviceExperts(self.devices[d], table.experts_on[d]) for d in range(table.num_devices)]
        self.home_device = weights.device  # where every expert parameter returns on restore
        self._place()
        self.calls = 0
        self.rows_per_device = [0] * table.num_devices

    def _place(self) -> None:
        _place_stacks(self.weights, self.groups, self.table.home)
        for name in _stack_names(self.weights):
            stack = getattr(self.weights, name)
            if isinstance(stack, FusedExpertTensor):
                if stack.storage().device.type != "cpu":
                    stack.set_storage(stack.storage().to("cpu"))
            else:
                stack.tensor = _meta_placeholder(stack, self.num_experts)

    def _is_current(self) -> bool:
        for name in _stack_names(self.weights):
            stack = getattr(self.weights, name)
            if isinstance(stack, FusedExpertTensor):
                data = stack.storage()
                held = [g.tensors[name] for g in self.groups if g.experts]
                if data.device.type != "cpu" or any(t.dtype != data.dtype for t in held):
                    return False
                continue
            params = stack.params
            for g, group in enumerate(self.groups):
                for i, e in enumerate(group.experts):
                    if self.table.home[e] == g and params[e].data_ptr() != group.tensors[name][i].data_ptr():
                        return False
                    if params[e].dtype != group.tensors[name].dtype:
                        return False
        return True

    def refresh(self) -> None:
        """After ``model.to(...)``: stack the (moved or cast) parameters again on their planned devices."""
        if not self._is_current():
            self._place()

    def weights_changed(self) -> None:
        """The parameters were written in place: the copies (fused slices, replicas) are taken again
        before the next call. Not now: a ``load_state_dict`` tells each expert module as soon as that
        module is loaded, before its siblings."""
        self._stale = True

    def _take_copies(self) -> None:
        if self.__dict__.get("_stale"):
            self._place()
            self._stale = False

    @torch.no_grad()
    def release(self) -> None:
        """``hf_moe_opt.restore``: every expert parameter goes back to the layer's device.

        The restored transformers block runs all its experts on the device of its inputs, so per-expert
        parameters left on their planned devices would make its forward fail.
        """
        home = self.home_device
        # Parameters left on the home device are views into its groups' stacks; where a stack also
        # holds replicas (copies of experts homed elsewhere), they get memory of their own, so that
        # the copies are freed with it.
        own = any(
            group.device == home and any(self.table.home[e] != g for e in group.experts)
            for g, group in enumerate(self.groups)
        )
        for name in _stack_names(self.weights):
            stack = getattr(self.weights, name)
            if isinstance(stack, FusedExpertTensor):
                if stack.storage().device != home:
                    stack.set_storage(stack.storage().to(home))
                continue
            for p in stack.params:
                if p.device != home:
                    p.data = p.data.to(home)
                elif own:
                    p.data = p.data.clone()
        for group in self.groups:
            group.tensors.clear()

    def stats(self) -> dict:
        return {"calls": self.calls, "rows_per_device": list(self.rows_per_device)}

    def run(
        self, x: torch.Tensor, plan: DispatchPlan, ffn_for: FfnFactory, activation: Activation, out_scale: float
    ) -> torch.Tensor:
        self._take_copies()
        num_devices = self.table.num_devices
        home = x.device
        target = self.table.targets(plan)
        perm = torch.sort(target, stable=True).indices
        hist = torch.zeros(num_devices + 1, dtype=torch.int64, device=home)
        hist.scatter_add_(0, target, torch.ones_like(target))
        sizes = hist[:num_devices].tolist()  # the one host synchronisation: sizes of the device groups
        _, _, local_index = self.table.tensors(home)
        expert = plan.expert[perm]
        starts = [sum(sizes[:d]) for d in range(num_devices)]
        # A copy between devices runs on the source's stream after a two-way barrier with the
        # destination's stream. So the other devices get their rows and start computing first: were
        # the home device's experts queued before, every later copy-in (on the home stream) would wait
        # for them, and the devices would run one after the other.
        order = sorted((d for d in range(num_devices) if sizes[d]), key=lambda d: self.groups[d].device == home)
        outputs: dict[int, torch.Tensor] = {}
        for d in order:
            n, start, group = sizes[d], starts[d], self.groups[d]
            idx = perm[start : start + n]
            dev = group.device
            xd = x[plan.token[idx]].to(dev, non_blocking=True)
            local = local_index[d][expert[start : start + n]].to(dev, non_blocking=True)
            gate = plan.gate[idx].to(dev, non_blocking=True)
            sub = _sub_plan(local, gate, len(group.experts))
            w1, b1, w2, b2 = group.weights()
            outputs[d] = ffn_for(dev, n)(xd, sub, w1, b1, w2, b2, activation, out_scale)
            self.rows_per_device[d] += n
        self.calls += 1
        # Rows stay in perm order (device by device, dropped rows last and zero): row i holds
        # assignment order[perm[i]], and one gather in _combine unsorts them.
        # (No out= writes: they would break autograd for callers outside no_grad.)
        kept_rows = sum(sizes)
        parts = [outputs[d].to(home, non_blocking=True) for d in sorted(outputs)]
        if kept_rows < plan.num_rows or not parts:
            parts.append(torch.zeros((plan.num_rows - kept_rows, x.shape[1]), dtype=x.dtype, device=home))
        return _combine(torch.cat(parts).to(x.dtype), plan.order[perm], plan, x.dtype)
