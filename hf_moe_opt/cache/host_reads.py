"""Read-behind expert caching: a decode step reads missing experts from pinned host memory.

A cached layer in its default mode (``cache_misses="copy"``) reads the router's choices on the host,
copies the missing experts into slots and waits for the copies before it computes: one host
synchronisation per layer call, and a decode step that cannot run ahead of the GPU. With
``cache_misses="read"`` a one-token call instead

1. runs the plan-free decode kernels (:func:`hf_moe_opt.kernels.gemv.gemv_moe_ffn`) over a device
   table of per-expert offsets (:class:`~hf_moe_opt.kernels.gemv.ExpertOffsets`): an expert whose
   copy into a slot is complete is read from the slot, every other one from its pinned host copy,
   which the GPU reads over the host link under unified addressing (``probe_zero_copy.py``: 68-85%
   of the copy engine's rate on an H200);
2. queues a device-to-host copy of its routing choices, with an event, and returns: no wait.

At the layer's next call, choices whose copies have arrived go to the policy (it runs one step
behind), and its loads are copied into slots on the copy stream. A load's victim is pointed back
at its host copy (a table update queued on the compute stream) before the copy stream may overwrite
its slot (the copy waits for everything the compute stream queued so far), and the loaded expert is
pointed at its slot only once its copy's event has completed. So every read is of complete weights,
and the outputs equal the resident layer's bit for bit (the same kernels over the same numbers).

Calls the decode kernels do not take (several tokens, the torch backend) run the default path
after the policy has caught up with every queued step; the table is then rebuilt from the slots.
Inside a captured decode step the decode kernels take up to :data:`STEP_MAX_TOKENS` tokens (a graph
cannot wait for the host), reading an expert missing from the slots once per token routed to it.

Inside a whole-step CUDA graph (``cuda_graphs="step"``) the layers leave their choices in device
buffers and, after the replay, hand them to their policies (``HF_MOE_OPT_STEP_HANDOVER``):

* ``lag`` (default): each layer's choices are copied to pinned memory behind the replay, as an eager
  call's are, and the host does not wait for them: the policies take a step's choices after the next
  step was launched (generate reads its tokens between steps, so they have arrived by then), while the
  GPU runs that next step. The loads start a step later than with ``step``, so a newly needed expert
  is read from host memory for one step more;
* ``step``: each layer's choices are read once the whole step has run (the host waits for the step,
  then runs the policies while the GPU idles);
* ``layer``: each layer also copies its choices to pinned memory and records an event right after its
  kernels, so the host takes the layers in order as each one's event fires: the policies run while
  the GPU still runs the step's later layers; the loads still start after the whole step;
* ``layer-early``: as ``layer``, and each layer's loads start at once (waiting for that layer's kernels
  only), beside the step's later layers and their reads of host memory.

On an H200 (greedy decoding, the resident model graphed in the same process; ``benchmarks/results/
host_reads_lag*_h200.json``, ``offload_nllb54b_lag*_h200.*``): switch-base-128 at 50% resident, batch 1,
``lag`` 0.93-1.12x the resident time per token over three runs, ``layer`` 1.33x, ``step`` 1.39-1.57x;
at batch 8 ``lag`` 1.26x / 1.28x (50% / 25%) against ``step``'s 1.55x / 1.97x; nllb-moe-54b at 50%
``lag`` 1.00x and 1.23x (``step`` 1.46x in an earlier run). ``layer-early`` was slower than ``step``
in an earlier run (its copies compete with the step's own host reads for the link).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..experts.backends import supported_direct_ffn
from .policies import Load

if TYPE_CHECKING:
    from ..experts.activation import Activation
    from .store import CachedExpertStore

__all__ = ["HostReads", "MAX_QUEUED_STEPS", "STEP_MAX_TOKENS", "captured_calls"]

# Steps whose choices may wait for the policy; one more waits for the oldest (bounds the lag).
MAX_QUEUED_STEPS = 8
# Pinned buffers the table pushes of one cache cycle through.
PUSH_RING = 4


def _capturing() -> bool:
    """Whether this call is being captured into a graph (or runs in ``step_graphs.EagerCapture``'s stand-in)."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a build of torch without CUDA, outside the stand-in
        return False


# Tokens of a captured decode step (sequences times beams) that read-behind caches can serve.
STEP_MAX_TOKENS = 8
HANDOVERS = ("lag", "step", "layer", "layer-early")


def _handover() -> str:
    """How a replayed step's choices reach the policies (module docs), from ``HF_MOE_OPT_STEP_HANDOVER``."""
    value = os.environ.get("HF_MOE_OPT_STEP_HANDOVER", "lag")
    if value not in HANDOVERS:
        raise ValueError(f"HF_MOE_OPT_STEP_HANDOVER must be one of {HANDOVERS}, not {value!r}")
    return value


@dataclass
class _StepBuffers:
    """Where a captured step leaves one layer's choices: a device buffer, and for a per-layer
    hand-over its pinned twin and the event recorded after the copy (else None)."""

    key: torch.Tensor
    host: torch.Tensor | None
    done: torch.cuda.Event | None


# While a step is being captured: the read-behind calls it makes, in order (see ``captured_calls``).
_CAPTURED_CALLS: list | None = None


@contextmanager
def captured_calls() -> Iterator[list[tuple[HostReads, int]]]:
    """Collects ``(host_reads, tokens)`` for each read-behind call captured inside the block, in call
    order: after each replay of that graph, ``host_reads.after_replay(tokens)`` runs for each."""
    global _CAPTURED_CALLS
    outer, _CAPTURED_CALLS = _CAPTURED_CALLS, []
    try:
        yield _CAPTURED_CALLS
    finally:
        _CAPTURED_CALLS = outer


_GRAPH_HOST_COPIES: dict[torch.device, bool] = {}


def _graphs_copy_to_host(device: torch.device) -> bool:
    """Whether a CUDA graph captured here can copy to pinned memory and record an external event (probed
    once per device with a tiny capture); without it a replayed step's choices are read after the step."""
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    ok = _GRAPH_HOST_COPIES.get(device)
    if ok is None:
        try:
            with torch.cuda.device(device):
                src = torch.zeros(4, dtype=torch.int64, device=device)
                dst = torch.empty(4, dtype=torch.int64, pin_memory=True)
                event = torch.cuda.Event(external=True)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    src.add_(1)
                    dst.copy_(src, non_blocking=True)
                    event.record()
                graph.replay()
                event.synchronize()
                ok = dst.tolist() == [1, 1, 1, 1]  # the capture itself runs nothing
        except Exception:  # noqa: BLE001 -- any failure means: do not use it
            ok = False
        _GRAPH_HOST_COPIES[device] = ok
    return ok


class HostReads:
    """The per-expert offset table, the queued routing choices and the in-flight loads of one
    :class:`~hf_moe_opt.cache.store.CachedExpertStore` in read-behind mode (see the module docs)."""

    def __init__(self, store: CachedExpertStore) -> None:
        self.store = store
        self.host_reads = 0  # assignments computed from the host copy
        self.host_read_bytes = 0
        # Device buffers a captured decode step reads and writes: kept (written in place) across
        # resets, so a graph captured before a clear() or load_state_dict() still sees the live ones.
        self._table: torch.Tensor | None = None
        self._step_bufs: dict[int, _StepBuffers] = {}  # a captured step's choices, by its tokens
        self._copy_after: torch.cuda.Event | None = None  # what loads wait for (None: all queued compute)
        # Table pushes go through pinned buffers (a pageable copy may wait for the stream to drain).
        self._push_ring: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._push_next = 0
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """New slots or a cold cache: every expert read from its host copy, nothing queued."""
        from ..kernels.gemv import ExpertOffsets

        store = self.store
        views = store._slot_tensors()  # (w1, b1, w2, b2) compute views of the slots
        homes = store._host_views()
        num_experts = store.num_experts
        self._host = np.zeros((4, num_experts + 1), dtype=np.int64)
        self._slot = np.zeros((4, store.num_slots), dtype=np.int64)
        for i, (view, home) in enumerate(zip(views, homes, strict=True)):
            if view is None:
                continue
            size, base, step = view.element_size(), view.data_ptr(), view.stride(0)
            if (home.data_ptr() - base) % size or home.stride() != view.stride():
                raise RuntimeError("the host copy of the experts is not laid out as the slots are")
            self._host[i, :num_experts] = (home.data_ptr() - base) // size + np.arange(num_experts) * step
            self._slot[i] = np.arange(store.num_slots) * step
        self._table_np = self._host.copy()
        self._table_host = torch.from_numpy(self._table_np)
        self._push_ring, self._push_next = [], 0  # sized for this table
        table = self._table
        if table is None or table.shape != self._table_host.shape or table.device != store.device:
            self._table = self._table_host.to(store.device, copy=True)
        else:
            self._push()
        weights = [0, 2]  # w1, w2: the offsets that decide whether the weight loads stay vectorised
        aligned = bool(all((self._host[i, :num_experts] % 8 == 0).all() and (self._slot[i] % 8 == 0).all()
                           for i in weights))  # fmt: skip
        rows = [self._table[i] if views[i] is not None else None for i in range(4)]
        self.offsets = ExpertOffsets(rows[0], rows[1], rows[2], rows[3], aligned=aligned)
        self._ready: frozenset[int] = frozenset()  # experts read from their slot
        self._queued: deque[tuple[object, torch.cuda.Event | None, frozenset[int]]] = deque()
        self._in_flight: deque[tuple[torch.cuda.Event | None, list[tuple[int, int, int]]]] = deque()
        self._slot_seq = [0] * store.num_slots  # the last load issued into each slot
        self._seq = 0
        # The GPU reads host memory only if it is page-locked (checked here, not per call).
        self._pin_error = None if store.device.type != "cuda" or store.host_pinned else str(store.pin_error)

    def __getstate__(self) -> dict:
        """A copy's state (its store catches up first): no CUDA events or pinned step buffers, which
        belong to this object's captured steps; the store's copy rebuilds the offsets (``reset``)."""
        state = dict(self.__dict__)
        state.update(_step_bufs={}, _push_ring=[], _push_next=0, _queued=deque(), _in_flight=deque(), _copy_after=None)
        return state

    def reset_stats(self) -> None:
        self.host_reads = 0
        self.host_read_bytes = 0

    # ------------------------------------------------------------------ calls
    def run(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        gates: torch.Tensor,
        keep: torch.Tensor | None,
        backend: str,
        activation: Activation,
        out_scale: float,
    ) -> torch.Tensor | None:
        """The call through the decode kernels over the offset table, or None where they do not apply."""
        store = self.store
        weights = store._slot_tensors()
        capturing = _capturing()
        # Eager calls: one token (beyond it the plan path reads a shared expert once); in a captured
        # decode step, up to STEP_MAX_TOKENS (a graph cannot wait for the host's copies). Other captures
        # (the encoder's) hand no choices over: one token, as eager calls.
        limit = STEP_MAX_TOKENS if capturing and _CAPTURED_CALLS is not None else None
        found = supported_direct_ffn(backend, x, lambda: weights, activation, limit) if backend else None
        if not capturing and 0 < x.shape[0] <= STEP_MAX_TOKENS:
            self._buffers(expert_index)  # a later capture of this step shape finds them (allocated here)
        if found is None:
            if capturing:
                raise RuntimeError(
                    'an expert cache with cache_misses="read" runs inside a captured decode step only for '
                    f"calls of at most {STEP_MAX_TOKENS} tokens on the Triton backend; this call has "
                    f"{x.shape[0]} tokens (backend {backend or 'plan'!r})"
                )
            return None
        if self._pin_error is not None:
            raise RuntimeError(
                'cache_misses="read" needs the experts in pinned host memory, which the GPU can read; '
                f"pinning failed: {self._pin_error}"
            )
        if not capturing:
            self.catch_up(wait=False)
        key = expert_index if keep is None else torch.where(keep, expert_index, store.num_experts)
        w1, b1, w2, b2 = weights
        out = found[0](x, key, gates, keep, w1, b1, w2, b2, activation, out_scale, offsets=self.offsets)
        if capturing:  # part of a whole-step graph: the choices stay on the device for after_replay()
            bufs = self._buffers(key)
            bufs.key.copy_(key.reshape(-1))
            if bufs.host is not None and bufs.done is not None:
                bufs.host.copy_(bufs.key, non_blocking=True)
                bufs.done.record()
            if _CAPTURED_CALLS is not None:
                _CAPTURED_CALLS.append((self, x.shape[0]))
        else:
            self._queue(key)
        return out

    def _buffers(self, key: torch.Tensor) -> _StepBuffers:
        """The buffers a captured step of ``key.shape[0]`` tokens leaves its choices in (made on first use)."""
        tokens = key.shape[0]
        bufs = self._step_bufs.get(tokens)
        if bufs is None or bufs.key.dtype != key.dtype or bufs.key.device != key.device:
            host = done = None
            # Made inside a capture only if no eager call of this shape came first: no probe (a capture
            # cannot nest), so such a step hands over after the whole step.
            per_layer = _handover() in ("layer", "layer-early") and not _capturing()
            if key.device.type == "cuda" and per_layer and _graphs_copy_to_host(key.device):
                done = torch.cuda.Event(external=True)
                host = torch.empty(key.numel(), dtype=key.dtype, pin_memory=True)
            device_key = torch.empty(key.numel(), dtype=key.dtype, device=key.device)
            bufs = self._step_bufs[tokens] = _StepBuffers(device_key, host, done)
        return bufs

    def after_replay(self, tokens: int) -> None:
        """After a captured decode step was launched (``cuda_graphs="step"``): its routing choices go to
        the policy, then finished copies are pointed at their slots for the next replay.

        With ``lag`` (the default) the choices are only queued, as an eager call's are, and the policy
        takes the queued steps whose copies have arrived (the previous step's, in ``generate``). With a
        per-layer hand-over (module docs) the graph copied them to pinned memory and recorded this
        layer's event: the host waits for this layer's part of the step only; with ``layer-early`` the
        loads wait for nothing later in the step either (only this layer reads its slots, and the table
        updates are queued behind the whole step)."""
        bufs = self._step_bufs[tokens]
        handover = _handover()
        if handover == "lag":  # no wait: taken at a later call, once its copy has arrived
            start = time.perf_counter()
            self._queue(bufs.key)
            self.catch_up(wait=False)
            self.store._host_ms += (time.perf_counter() - start) * 1e3
            return
        done, host = bufs.done, bufs.host
        if done is not None and host is not None:
            done.synchronize()
            choices = host.tolist()
        else:
            choices = bufs.key.tolist()
        start = time.perf_counter()  # the host's work once the choices are here (the wait is the GPU's step)
        self._queued.append((choices, None, self._ready))
        self._copy_after = done if handover == "layer-early" else None
        try:
            self.catch_up(wait=False)
        finally:
            self._copy_after = None
            self.store._host_ms += (time.perf_counter() - start) * 1e3

    def _queue(self, key: torch.Tensor) -> None:
        """Keep this call's choices for the policy: on CUDA a copy to pinned memory and its event."""
        if len(self._queued) >= MAX_QUEUED_STEPS:
            self._apply(*self._queued.popleft(), wait=True)
        flat = key.reshape(-1)
        if flat.device.type != "cuda":
            self._queued.append((flat.tolist(), None, self._ready))
            return
        buf = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        buf.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(flat.device))
        self._queued.append((buf, done, self._ready))

    def catch_up(self, wait: bool) -> None:
        """Give the policy every queued step whose choices have arrived (all with ``wait``), issue its
        loads, and point experts whose copies have completed at their slots."""
        while self._queued and (wait or self._queued[0][1] is None or self._queued[0][1].query()):
            self._apply(*self._queued.popleft(), wait=wait)
        changed = False
        while self._in_flight:
            done, loads = self._in_flight[0]
            if done is not None:
                if wait:
                    done.synchronize()
                elif not done.query():
                    break  # the copy stream runs in order: the later loads are not done either
            self._in_flight.popleft()
            slot_of = self.store._slot_of
            for expert, slot, seq in loads:
                # Only the slot's latest load, and only while the expert still owns the slot.
                if self._slot_seq[slot] == seq and slot_of.get(expert) == slot:
                    self._table_np[:, expert] = self._slot[:, slot]
                    self._ready = self._ready | {expert}
                    changed = True
        if changed:
            self._push()

    def _apply(self, choices, done: torch.cuda.Event | None, ready: frozenset[int], wait: bool) -> None:
        """One queued step through the policy: its counters, then its loads."""
        if done is not None:
            done.synchronize()  # no-op once completed (catch_up checks first unless told to wait)
            choices = choices.tolist()
        store = self.store
        tally: dict[int, int] = {}
        for e in choices:
            tally[e] = tally.get(e, 0) + 1
        tally.pop(store.num_experts, None)  # dropped assignments
        needed = sorted(tally)
        far = [e for e in needed if e not in ready]
        self.host_reads += sum(tally[e] for e in far)
        self.host_read_bytes += sum(tally[e] for e in far) * store.expert_nbytes
        outcome = store.policy.step(needed, [tally[e] for e in needed])
        store._steps += 1
        store._hits += len(outcome.hits)
        store._misses += len(outcome.misses)
        if len(outcome.chunks) > 1:
            store._chunked_steps += 1
        if outcome.loads:
            self._load(list(outcome.loads))

    def _load(self, loads: list[Load]) -> None:
        """Victims back to their host copies (before their slots are written), then the copies."""
        ready = set(self._ready)
        for ld in loads:
            if ld.evicted is not None:
                self._table_np[:, ld.evicted] = self._host[:, ld.evicted]
                ready.discard(ld.evicted)
            self._table_np[:, ld.expert] = self._host[:, ld.expert]  # until its copy completes
            ready.discard(ld.expert)
        self._ready = frozenset(ready)
        self._push()
        # The copy stream waits for the compute queued so far, or in a replayed step for this layer's part.
        done = self.store._issue(loads, after=self._copy_after)
        entries = []
        for ld in loads:
            self._seq += 1
            self._slot_seq[ld.slot] = self._seq
            entries.append((ld.expert, ld.slot, self._seq))
        self._in_flight.append((done, entries))

    def _push(self) -> None:
        """The host table to the device table, queued on the compute stream."""
        if self._table.device.type != "cuda":
            self._table.copy_(self._table_host)
            return
        # Through a ring of pinned buffers: the host table may change right after, and a pageable
        # copy can make the host wait for the stream (a replay still running). A buffer is reused
        # only once its last copy has completed (pushes of four calls ago: never waited for in practice).
        if len(self._push_ring) < PUSH_RING:
            host = self._table_host
            self._push_ring.append((torch.empty(host.shape, dtype=host.dtype, pin_memory=True), torch.cuda.Event()))
        i = self._push_next
        self._push_next = (i + 1) % PUSH_RING
        buf, done = self._push_ring[i]
        done.synchronize()  # returns at once for an event never recorded
        buf.copy_(self._table_host)
        self._table.copy_(buf, non_blocking=True)
        done.record(torch.cuda.current_stream(self._table.device))  # one event per buffer, re-recorded

    def after_copy_step(self) -> None:
        """After a call on the default path (every queued step applied, its loads waited for by the
        compute stream): every resident expert is read from its slot."""
        self._table_np[:] = self._host
        slot_of = self.store._slot_of
        for expert, slot in slot_of.items():
            self._table_np[:, expert] = self._slot[:, slot]
        self._ready = frozenset(slot_of)
        self._in_flight.clear()
        self._push()
