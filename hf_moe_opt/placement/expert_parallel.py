"""Expert parallelism over ``torch.distributed``: each rank holds the experts a plan puts on it.

Every rank runs the whole model on its own batch (the dense layers are replicated); inside each MoE
layer the routed rows travel to the ranks that hold their experts and the outputs travel back:

1. one ``all_to_all_single`` of the ``[world, num_experts]`` row counts (what this rank sends to
   each rank for each expert), so every rank learns what it will receive;
2. one variable-size ``all_to_all_single`` of the rows (split sizes from step 1), there;
3. the local experts run over the received rows (a sub-plan sorted by local expert);
4. one variable-size ``all_to_all_single`` of the outputs, back; the sender applies the gates and
   combines exactly as the single-process layer does.

NCCL on CUDA, gloo on CPU (rows live on the layer's device, so the backend must match it).
Multi-node runs are the same code under ``torchrun``.

Rules that follow from the collectives:

* every rank must call every MoE layer the same number of times (the same number of forward
  passes; in ``generate`` the same ``max_new_tokens`` and ``min_new_tokens`` equal to it, since a
  rank whose sequences all end early stops calling; a rank may pass zero tokens); a rank that
  stops calling, or dies, makes the others fail with the process group's timeout (set it with
  ``init_process_group(timeout=...)``), reported as a :class:`RuntimeError` naming the layer; ranks
  out of step (one in another layer, or a call ahead) raise a :class:`RuntimeError` naming both
  layers at their next exchange (the row counts carry the layer and the call number);
* at setup the ranks compare their models and plans with one ``all_gather_object``; any mismatch
  (different layers, expert counts, shapes, dtypes or placements) raises :class:`ValueError` on
  every rank. An error one rank finds in its own arguments before that (an unsupported dtype, a
  plan that is not a :class:`PlacementPlan`) raises on that rank, and the others fail when it
  leaves the process group;
* rank ``r`` frees the parameters of the experts it does not hold: its ``state_dict`` only holds its
  own experts (``experts.expert_{j}`` entries of the other experts are gone; a fused
  ``experts.gate_up_proj`` / ``down_proj`` (+ biases) shrinks to ``[n_r, ...]``, the rank's experts
  in ``plan.experts_on(layer, r)`` order), and the model cannot be restored with
  :func:`hf_moe_opt.restore`; reload it instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch import DispatchPlan
from ..experts.activation import Activation
from ..experts.store import ExpertStore, FfnFactory
from ..experts.weights import ExpertStack, ExpertWeights, FusedExpertTensor
from .store import (
    ReplicaTable,
    _combine,
    _DeviceExperts,
    _inverse,
    _meta_placeholder,
    _place_stacks,
    _stack_names,
    _sub_plan,
)

DTYPE_BUFFER = "_hf_moe_opt_expert_dtype"
_TAG_NAMES: dict[int, str] = {}  # layer tag -> layer name, for the out-of-step error
_HINT = (
    "a peer rank died or timed out, or the ranks called the MoE layers a different number of times "
    "(every rank must run the same number of forward passes; a rank may pass zero tokens)"
)


def resolve_group(expert_parallel: Any) -> Any:
    """The process group to use for ``expert_parallel=True`` (the default group) or a given group."""
    if not dist.is_available():
        raise RuntimeError("expert_parallel=True needs torch.distributed, which this torch build lacks")
    if expert_parallel is not True and not isinstance(expert_parallel, dist.ProcessGroup):
        raise TypeError(f"expert_parallel takes True, False or a torch.distributed group, got {expert_parallel!r}")
    if not dist.is_initialized():
        raise RuntimeError(
            "expert_parallel=True needs an initialised process group: launch with torchrun (or accelerate "
            "launch) and call torch.distributed.init_process_group(backend='nccl' or 'gloo', timeout=...) "
            "before hf_moe_opt.optimize"
        )
    return None if expert_parallel is True else expert_parallel


def layer_signature(name: str, weights: ExpertWeights, family: str) -> dict[str, Any]:
    """What must agree across ranks for one layer."""
    return {
        "name": name,
        "family": family,
        "stacks": {
            n: [list(getattr(weights, n).tensor.shape), str(getattr(weights, n).tensor.dtype)]
            for n in _stack_names(weights)
        },
    }


def check_ranks_agree(signature: dict[str, Any], group: Any) -> None:
    """``all_gather_object`` the signatures; raise the same clear error on every rank if they differ."""
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, signature, group=group)
    reference = gathered[0]
    problems = []
    for rank, sig in enumerate(gathered):
        if sig == reference:
            continue
        for key in sorted(set(sig) | set(reference)):
            if sig.get(key) != reference.get(key):
                mine, theirs = sig.get(key), reference.get(key)
                problems.append(f"rank {rank} {key}={_short(mine)} but rank 0 {key}={_short(theirs)}")
    if problems:
        raise ValueError(
            "expert parallelism needs the same model and placement plan on every rank; mismatch: "
            + "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "...]"


def plan_digest(plan_json: str) -> str:
    return hashlib.sha256(plan_json.encode("utf-8")).hexdigest()[:16]


class ExpertParallelStore(ExpertStore):
    """The experts of one layer that this rank holds, and the all-to-all exchange that feeds them.

    Args:
        weights: the layer's stacked weights (all experts, this rank's device).
        table: the layer's placement; plan device ``r`` is rank ``r`` of ``group``.
        group: process group (None: the default group).
        name: the layer's module name (for error messages).
    """

    def __init__(self, weights: ExpertWeights, table: ReplicaTable, group: Any, name: str):
        super().__init__(weights)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if table.num_devices != self.world:
            raise ValueError(
                f"the placement plan spreads experts over {table.num_devices} devices but the process group "
                f"has {self.world} ranks; plan for num_devices={self.world}"
            )
        self.table = table
        self.name = name
        self.num_experts = table.num_experts
        device = weights.device
        self.local = _DeviceExperts(device, table.experts_on[self.rank])
        self.calls = 0
        # Sent with the row counts, so that ranks out of step (one in another layer, or a call ahead)
        # fail at once instead of pairing different layers' rows.
        self._tag = int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big")
        _TAG_NAMES[self._tag] = name
        self.rows_sent = 0
        self.rows_computed = 0
        self._dtype_owner: nn.Module | None = None
        self._place()

    def _weight_dtype(self) -> torch.dtype:
        """The experts' dtype, the same on every rank (also on one that holds no experts): rows travel
        in it, so every rank sizes its all-to-all buffers alike."""
        w1 = self.weights.w1
        if isinstance(w1, FusedExpertTensor):
            return w1.param.dtype  # a [0, ...] parameter on a rank without experts: cast with the model
        if not self.local.experts and self._dtype_owner is not None:
            return getattr(self._dtype_owner, DTYPE_BUFFER).dtype
        return w1.tensor.dtype

    def track_dtype(self, module: nn.Module) -> None:
        """Keep the experts' dtype in an empty non-persistent buffer of ``module`` (the layer).

        A rank that holds none of the layer's experts keeps no expert parameter that ``model.to(dtype)``
        would cast; the buffer is cast with the model (and is not in the ``state_dict``), so that rank
        still sends its rows in the dtype the other ranks expect.
        """
        probe = torch.empty(0, dtype=self._weight_dtype(), device=self.local.device)
        module.register_buffer(DTYPE_BUFFER, probe, persistent=False)
        self._dtype_owner = module

    def _fused(self) -> bool:
        return isinstance(self.weights.w1, FusedExpertTensor)

    @torch.no_grad()
    def _place(self) -> None:
        if self._fused():
            # Shrunk in place: the kept slices become the parameters (no second copy), the rest is freed.
            for name in _stack_names(self.weights):
                self.local.tensors[name] = getattr(self.weights, name).keep_experts(self.local.experts)
            return
        keep = set(self.local.experts)
        _place_stacks(self.weights, [self.local], None)
        for name in _stack_names(self.weights):
            stack: ExpertStack = getattr(self.weights, name)
            placeholder = _meta_placeholder(stack, self.num_experts)
            for e, p in enumerate(stack.params):
                if e not in keep:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            stack.params = [stack.params[e] for e in self.local.experts]
            stack.tensor = placeholder

    def refresh(self) -> None:
        """After ``model.to(...)``: stack this rank's (moved or cast) expert parameters again."""
        if self._fused():
            for name in _stack_names(self.weights):
                stack: FusedExpertTensor = getattr(self.weights, name)
                self.local.tensors[name] = stack.compute_view(stack.param.data)
            self.local.device = self.weights.w1.param.device
            return
        local_params = {n: getattr(self.weights, n).params for n in _stack_names(self.weights)}
        current = all(
            p.data_ptr() == self.local.tensors[n][i].data_ptr() and p.dtype == self.local.tensors[n].dtype
            for n, params in local_params.items()
            for i, p in enumerate(params)
        )
        if current:
            return
        device = local_params["w1"][0].device
        with torch.no_grad():
            for n, params in local_params.items():
                new = torch.empty((len(params), *params[0].shape), dtype=params[0].dtype, device=device)
                for i, p in enumerate(params):
                    new[i].copy_(p.data)
                    p.data = new[i]
                self.local.tensors[n] = new
                stack: ExpertStack = getattr(self.weights, n)
                stack.tensor = torch.empty((self.num_experts, *params[0].shape), dtype=params[0].dtype, device="meta")
        self.local.device = device

    def weights_changed(self) -> None:
        """Writes in place reach the local experts by themselves (they are the parameters' storage);
        parameters re-pointed one by one (``p.data = ...``) are stacked again."""
        self.refresh()

    def stats(self) -> dict:
        return {"calls": self.calls, "rows_sent": self.rows_sent, "rows_computed": self.rows_computed}

    def _all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: Sequence[int] | None = None,
        in_splits: Sequence[int] | None = None,
    ) -> None:
        try:
            dist.all_to_all_single(
                out,
                inp,
                output_split_sizes=None if out_splits is None else list(out_splits),
                input_split_sizes=None if in_splits is None else list(in_splits),
                group=self.group,
            )
        except Exception as exc:  # noqa: BLE001 - every backend failure gets the same explanation
            raise RuntimeError(
                f"expert-parallel all-to-all in MoE layer {self.name!r} failed on rank {self.rank} "
                f"(call {self.calls}): {_HINT}. Cause: {exc}"
            ) from exc

    def _check_in_step(self, stamps: list[int]) -> None:
        """``stamps``: each source rank's (layer tag, call number); all must be this call's."""
        for source in range(self.world):
            tag, call = stamps[2 * source], stamps[2 * source + 1]
            if (tag, call) != (self._tag, self.calls):
                other = _TAG_NAMES.get(tag, f"an unknown layer (tag {tag})")
                raise RuntimeError(
                    f"expert-parallel ranks out of step: rank {self.rank} is in MoE layer {self.name!r} "
                    f"(call {self.calls}) while rank {source} is in {other!r} (call {call}); {_HINT}"
                )

    def run(
        self, x: torch.Tensor, plan: DispatchPlan, ffn_for: FfnFactory, activation: Activation, out_scale: float
    ) -> torch.Tensor:
        world, num_experts = self.world, self.num_experts
        device = x.device
        w1, b1, w2, b2 = self.local.weights() if self.local.experts else (None, None, None, None)
        row_dtype = self._weight_dtype()
        target = self.table.targets(plan)
        kept = target < world
        perm = torch.sort(target, stable=True).indices  # rows grouped by rank, by expert inside a rank
        expert = plan.expert.clamp(max=num_experts - 1)
        key = torch.where(kept, target * num_experts + expert, world * num_experts)
        hist = torch.zeros(world * num_experts + 1, dtype=torch.int64, device=device)
        hist.scatter_add_(0, key, torch.ones_like(key))
        # Per destination rank: the row counts per expert, then this layer's tag and call number.
        send = torch.empty((world, num_experts + 2), dtype=torch.int64, device=device)
        send[:, :num_experts] = hist[: world * num_experts].view(world, num_experts)
        send[:, num_experts] = self._tag
        send[:, num_experts + 1] = self.calls
        recv = torch.empty_like(send)
        self._all_to_all(recv, send)
        recv_counts = recv[:, :num_experts]
        head = torch.cat([send[:, :num_experts].sum(1), recv_counts.sum(1), recv[:, num_experts:].reshape(-1)])
        recv_counts = recv_counts.reshape(-1)
        read = head.tolist()  # the host synchronisation every variable all-to-all needs
        send_splits, recv_splits, stamps = read[:world], read[world : 2 * world], read[2 * world :]
        self._check_in_step(stamps)
        num_send, num_recv = sum(send_splits), sum(recv_splits)
        rows = perm[:num_send]
        send_x = x[plan.token[rows]].to(row_dtype)
        recv_x = torch.empty((num_recv, x.shape[1]), dtype=row_dtype, device=device)
        self._all_to_all(recv_x, send_x, recv_splits, send_splits)

        # Local experts over the received rows: from each source, rows arrive sorted by expert.
        if num_recv:
            expert_ids = torch.arange(num_experts, device=device).repeat(world)
            recv_expert = torch.repeat_interleave(expert_ids, recv_counts, output_size=num_recv)
            _, _, local_index = self.table.tensors(device)
            local = local_index[self.rank][recv_expert]
            order = torch.sort(local, stable=True).indices
            ones = torch.ones(num_recv, dtype=row_dtype, device=device)  # gates apply on the way back
            sub = _sub_plan(local[order], ones, len(self.local.experts))
            y_sorted = ffn_for(device, num_recv)(recv_x[order], sub, w1, b1, w2, b2, activation, 1.0)
            y_recv = y_sorted.index_select(0, _inverse(order))  # back to arrival order
        else:
            y_recv = recv_x  # empty
        back = torch.empty((num_send, x.shape[1]), dtype=y_recv.dtype, device=device)
        self._all_to_all(back, y_recv.contiguous(), send_splits, recv_splits)
        self.calls += 1
        self.rows_sent += num_send
        self.rows_computed += num_recv

        # Gate, scale and combine as the single-process backend does (same dtypes, same order). The
        # rows stay in perm order (kept rows first, dropped rows zero) and _combine gathers them.
        y = back * plan.gate[rows, None]
        if out_scale != 1.0:
            y = y * out_scale
        if num_send < plan.num_rows:
            y = torch.cat([y, y.new_zeros((plan.num_rows - num_send, x.shape[1]))])
        return _combine(y, plan.order[perm], plan, x.dtype)
