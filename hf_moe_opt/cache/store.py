"""Expert buffering: a layer's experts in (pinned) host memory, a few device slots, an eviction policy.

:class:`CachedExpertStore` is the :class:`~hf_moe_opt.experts.store.ExpertStore` behind
``optimize(model, expert_cache=...)``. For one MoE layer it holds

* every expert's weights once, in host memory, page-locked (pinned) when the platform allows:
  per-expert parameters ``experts.expert_{j}.*`` are re-pointed at slices of one stacked
  ``[E, ...]`` host tensor; fused parameters (``experts.gate_up_proj [E, 2F, D]`` and the like,
  transformers 5.x's Mixtral, Qwen, OLMoE, DeepSeek, GPT-OSS) get their data replaced by a host
  copy in the same layout. Either way ``state_dict`` is unchanged, no second copy exists and
  expert ``j``'s slice ``[j]`` is contiguous;
* ``num_slots`` device slots per tensor, ``[S, ...]`` in the host tensor's layout (one contiguous
  copy per load), which the expert kernels run on as if they were ``S`` experts (through
  ``compute_view``: GPT-OSS's ``[S, in, out]`` slots are seen transposed, as its parameters are);
* an online eviction policy (:func:`hf_moe_opt.cache.make_policy`) that decides, step by step,
  which expert goes into which slot.

Shared experts (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``) are dense modules of
the layer, not routed experts: they are not in the store and stay resident on the compute device.

One forward of the layer (a *step*) starts from the router's choices (no plan over all experts):

1. The experts the step routes to and their assignment counts are read on the host (the choices
   themselves for a decode step's few assignments, per-expert counts made on the device for more).
   This is the one host synchronisation per layer call, and it is inherent to a cache: which experts
   to copy is a host decision. Everything else stays on the device.
2. The policy returns the hits, the loads (expert -> slot, victim) and the chunks (one unless the
   step needs more experts than there are slots).
3. Loads are copied host -> device on a dedicated CUDA stream, one event per chunk. The experts
   already resident (the hits) are computed first, while the misses' copies run; the compute then
   waits on the copy event and runs the loaded experts. Steps of fewer than
   :data:`OVERLAP_MIN_ASSIGNMENTS` assignments (decode) wait for their copies and run every expert
   at once instead: there the hits' compute is shorter than the second group's kernel launches.
   Oversubscribed steps repeat load/compute per chunk; a chunk's copies wait for the compute of the
   chunk before it (its victims).
4. The compute reuses the layer's backend over the slots: the choices are mapped to slot ids by a
   device table (experts outside the group are marked dropped) and the dispatch plan is built over
   the slots, or, for one token on the Triton backend, the plan-free decode kernels run as the
   resident layer's do, on the expert ids, reading each one's slot from the table themselves (no
   indexing launch). Every expert sees the same rows in the same order as in the
   resident layer, and every token's top-k expert outputs are summed in the same order, so the
   output is bitwise the resident layer's for the torch backend. (The Triton kernels pick launch
   configurations by expert count; with a different slot count they may pick another one, which
   changes rounding within the kernel's own tolerance; a one-token step whose experts run in two
   groups rounds each group's sum once.)

Decode at small batches is bound by the host (Python and kernel launches), so the common step is
kept short. The expert -> slot map lives on the device as an ``[E + 1]`` table that changes only
when a load does (the host keeps a mirror and copies it over after loads, never on an all-hit step).
A step whose needed experts all end up resident together (every hit-only step, every small step
whose misses all fit, and a larger step with misses only) is one group: one lookup in the table,
one plan over the slots (or none) and one expert call. Only steps that overlap copies with compute
or are oversubscribed run several groups, with their per-group maps sent in one copy.

Statistics (hits, misses, bytes copied, copy and stall time) are kept per store; CUDA times are
measured with events and resolved lazily, so recording them adds no synchronisation.

On a machine without CUDA the slots live on the CPU (useful for tests) and pinned memory is
unavailable: the weights stay in pageable memory and :attr:`CachedExpertStore.pin_error` says why
(``optimize`` turns that into a warning).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from itertools import compress

import numpy as np
import torch
from torch import nn

from ..dispatch import DispatchPlan, make_plan
from ..experts.activation import Activation
from ..experts.backends import supported_direct_ffn
from ..experts.store import ExpertStore, FfnFactory
from ..experts.weights import ExpertTensor, ExpertWeights
from ..grad_mode import records_grad
from .host_reads import HostReads
from .policies import EvictionPolicy, Load, make_policy

__all__ = ["CachedExpertStore", "expert_nbytes"]

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# Calls with at most this many assignments read the router's choices on the host as they are (decode
# steps); larger ones count them per expert on the device first.
HOST_CHOICES_MAX = 256
# Steps with fewer assignments than this wait for their loads and run all their experts as one group:
# computing the hits while the misses copy saves less than the second group's launches cost the host.
OVERLAP_MIN_ASSIGNMENTS = 64


class PrefetchChain(dict):
    """``{device: weak reference to the cached store that ran last there}``, shared by the stores that
    may follow each other (one model's). A copy of those stores (``copy.deepcopy``, pickling) shares
    one new, empty chain: weak references do not copy, and two copies must not prefetch into each
    other's slots."""

    def __reduce__(self):
        return (PrefetchChain, ())


# The cached store that ran last on each device: the next one to run learns its predecessor from it.
# The process-wide chain of stores enabled without one of their own (optimize gives each call its own).
_LAST_STORE: PrefetchChain = PrefetchChain()
# Resolve finished CUDA timing events once this many are pending.
_MAX_PENDING_EVENTS = 256


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One host-to-device copy stream per CUDA device, shared by every cached layer on it."""
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = torch.cuda.Stream(device=device)
        _COPY_STREAMS[device] = stream
    return stream


@torch.no_grad()
def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool = False) -> None:
    """``dst.copy_(src)`` for every ``(dst, src)`` in one call (less host work than a Python loop; the
    copy rate is the same either way, ``benchmarks/probe_copy_issue.py``)."""
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs], non_blocking=non_blocking)


def expert_nbytes(weights: ExpertWeights) -> int:
    """Bytes of one expert's weights (all stacks: ``w1``, ``w2`` and the biases)."""
    return sum(s.tensor[0].numel() * s.tensor.element_size() for s in weights.stacks())


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, str | None]:
    """An empty host tensor, page-locked if ``pin`` and possible; returns ``(tensor, why not pinned)``."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True), None
        except RuntimeError as err:  # no CUDA, or the driver refused to lock more memory
            return torch.empty(shape, dtype=dtype), str(err).strip().splitlines()[0]
    return torch.empty(shape, dtype=dtype), "pinning disabled"


@torch.no_grad()
def _move_to_host(stack: ExpertTensor, pin: bool) -> str | None:
    """Give ``stack`` one host tensor that backs its parameter(s); returns why it is not pinned.

    Per-expert parameters get one stacked host tensor whose slices they become; a fused parameter's
    data is replaced by a host copy in the same layout. Either way the host tensor *is* the
    parameter data: ``state_dict`` is unchanged and no second copy exists.
    """
    current = stack.storage() if stack.is_current(full=True) else None
    if current is not None and current.device.type == "cpu" and (current.is_pinned() or not pin):
        return None if current.is_pinned() else "pinning disabled"
    if current is not None and current.device.type == "cpu":
        # Already in host memory: only page-locking it would change anything.
        host, why = _host_empty(tuple(current.shape), current.dtype, pin)
        if why is not None:
            return why
    elif current is not None:
        host, why = _host_empty(tuple(current.shape), current.dtype, pin)
    else:  # per-expert parameters moved one by one (model.to): gather them straight from where they are
        first = stack.params[0]
        host, why = _host_empty((len(stack.params), *first.shape), first.dtype, pin)
        for j, p in enumerate(stack.params):
            host[j].copy_(p.data)
            p.data = host[j]  # the old storage goes as soon as nothing else points at it
        stack.tensor = host
        return why
    host.copy_(current)
    stack.set_storage(host)  # the old (device or pageable) storage is freed here
    return why


class CachedExpertStore(ExpertStore):
    """A layer's experts in host memory, served through a fixed set of device slots.

    Args:
        weights: the layer's stacked expert weights (moved to host memory here).
        num_slots: device slots, pinned experts' slots included; ``1 <= num_slots <= E``.
        device: the compute device (where the slots live and the layer's input arrives).
        policy: an eviction policy name (:data:`hf_moe_opt.cache.POLICY_NAMES`).
        pinned: experts that are never evicted (they still load on first use).
        pin_memory: page-lock the host copy when serving a GPU (falls back to pageable memory where
            impossible; see :attr:`pin_error`). A cache that serves the CPU never pins.
        policy_options: extra options for the policy (see :func:`hf_moe_opt.cache.make_policy`).

    Raises:
        ValueError: an unknown policy or impossible slot/pinned settings.
    """

    def __init__(
        self,
        weights: ExpertWeights,
        num_slots: int,
        device: torch.device | str,
        *,
        policy: str = "changepoint",
        pinned: Iterable[int] = (),
        pin_memory: bool = True,
        policy_options: dict | None = None,
    ):
        super().__init__(weights)
        num_experts = weights.num_experts
        if not 1 <= int(num_slots) <= num_experts:
            raise ValueError(f"num_slots must be in [1, {num_experts}], got {num_slots}")
        self.policy: EvictionPolicy = make_policy(policy, int(num_slots), num_experts, pinned, **(policy_options or {}))
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin_memory = bool(pin_memory)
        self.home_device = weights.device  # where the experts were before; restore() brings them back
        self.pin_error: str | None = None
        self._reads: HostReads | None = None  # read-behind mode (enable_host_reads)
        self._home()
        self._alloc_slots()
        # The run-time check that no parameter was moved behind the store's back (``is_current`` per
        # call would build views): the first and last expert parameter of every stack, by address.
        self._key_params = [p for s in self.weights.stacks() for p in (s.params[0], s.params[-1])]
        self._checked_key: list[int] | None = None  # _weights_key() when last found current
        self._expert_ids = range(num_experts)
        # Look-ahead (enable_prefetch): the cached layer that ran after this one last time, the router
        # that predicts this layer's experts, its top-k, and the experts a predecessor prefetched here.
        self.prefetch = False
        self._chain_of: dict[torch.device, weakref.ref] = _LAST_STORE
        self._next: weakref.ref | None = None
        self._predictor: nn.Module | None = None
        self._top_k = 0
        self._prefetched: frozenset[int] = frozenset()
        self._prefetch_done: torch.cuda.Event | None = None
        # Prefetched experts the step after the look-ahead did not need, and the event their copies end
        # with: a later step that needs one waits for it then (not every step for every wrong guess).
        self._unwaited: set[int] = set()
        self._unwaited_done: torch.cuda.Event | None = None
        self._last_compute: torch.cuda.Event | None = None
        self.reset_stats()

    # ---------------------------------------------------------------- copies
    def __getstate__(self) -> dict:
        """The state a copy (``copy.deepcopy``, pickling the model) takes: queued work finished first,
        and no CUDA events, which belong to this store's own copies and steps."""
        if self._reads is not None:
            self._reads.catch_up(wait=True)
        if hasattr(self, "_pending"):
            self._resolve_events(wait=True)
        state = dict(self.__dict__)
        # A model's own look-ahead chain copies as a new empty one; the process-wide one stays that.
        chain = None if self._chain_of is _LAST_STORE else self._chain_of
        state.update(_prefetch_done=None, _unwaited_done=None, _last_compute=None, _next=None, _chain_of=chain)
        return state

    def __setstate__(self, state: dict) -> None:
        # A copy's tensors are new, but what is derived from their addresses is not: the slot map's
        # numpy view of its host mirror no longer shares memory with it, the read-behind offset table
        # holds the original's host addresses, and page-locking is not copied. The copy starts cold at
        # its first call, with all of that rebuilt (_follow).
        self.__dict__.update(state)
        if self._chain_of is None:
            self._chain_of = _LAST_STORE
        self._copied = True

    def _rebuild_copy(self) -> None:
        del self._copied
        if self.device.type == "cuda" and self.pin_memory and not self.host_pinned:
            self._home()
        self._alloc_slots()  # slots, the slot map and its views, the read-behind offsets; cold policy
        self._checked_key = None

    # ---------------------------------------------------------------- memory
    @property
    def num_slots(self) -> int:
        return self.policy.num_slots

    @property
    def num_experts(self) -> int:
        return self.policy.num_experts

    @property
    def host_pinned(self) -> bool:
        """Whether the host copy is page-locked."""
        return all(s.storage().is_pinned() for s in self.weights.stacks())

    @property
    def expert_nbytes(self) -> int:
        """Bytes copied per expert load."""
        return self._expert_nbytes

    @property
    def slot_nbytes(self) -> int:
        """Device memory held by the slots."""
        return sum(t.numel() * t.element_size() for t in self._slots)

    def _home(self) -> None:
        # Page-locking only helps copies to a GPU: a cache that serves the CPU leaves memory pageable.
        pin = self.pin_memory and self.device.type == "cuda"
        why = None
        for stack in self.weights.stacks():
            why = _move_to_host(stack, pin) or why
        self.pin_error = why if pin else None

    def _alloc_slots(self) -> None:
        # Slots in the host tensors' layout, so a load is one contiguous copy per tensor; the kernels
        # see them through compute_view (e.g. GPT-OSS's [S, in, out] slots as [S, out, in]).
        self._slots = [
            torch.empty((self.num_slots, *h.shape[1:]), dtype=h.dtype, device=self.device) for h in self._host_tensors()
        ]
        self._views = None  # _slot_tensors(), built once per allocation
        self._slots_from = self._host_pointers()  # the host memory the slots were filled from
        self._expert_nbytes = expert_nbytes(self.weights)  # the dtype may have changed (refresh)
        self._reset_table()
        self.policy.reset()

    def _reset_table(self) -> None:
        """Every expert out of the slots: the slot map says ``S`` (dropped) for all ``E + 1`` entries."""
        self._slot_of: dict[int, int] = {}  # mirror of the policy's residents, as the slots hold them
        # Slot of every expert (S: not resident; entry E is the plan's dropped rows). The host copy is
        # pageable on purpose: a non-blocking copy from pageable memory is staged before it returns, so
        # the mirror may change right after, and it does not hold the host while the stream waits for
        # loads (benchmarks/probe_table_copy.py); the device copy is refreshed only after loads.
        self._table_host = torch.full((self.num_experts + 1,), self.num_slots, dtype=torch.long)
        self._table_np = self._table_host.numpy()
        self._table = self._table_host.to(self.device, copy=True)  # a copy on the CPU too: one code path
        self._table_stale = False
        self._prefetched = frozenset()  # a look-ahead's loads are forgotten with the slots
        self._prefetch_done = None
        self._unwaited = set()  # their slots get new loads, queued behind these copies before any read
        self._unwaited_done = None
        if getattr(self, "_reads", None) is not None:
            self._reads.reset()  # new slots or a cold cache: every expert read from its host copy

    def _slot_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        if self._views is None:
            self._views = self._compute_views(self._slots)
        return self._views

    def _host_views(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The host copy as the kernels see the slots: ``(w1, b1, w2, b2)``, ``[E, ...]`` each."""
        return self._compute_views(self._host_tensors())

    def _compute_views(self, tensors: list[torch.Tensor]) -> tuple:
        it = (s.compute_view(t) for s, t in zip(self.weights.stacks(), tensors, strict=True))
        w1 = next(it)
        w2 = next(it)
        b1 = next(it) if self.weights.b1 is not None else None
        b2 = next(it) if self.weights.b2 is not None else None
        return (w1, b1, w2, b2)

    def _weights_key(self) -> list[int]:
        """Where the first and last expert parameter of every stack point now (cheap: no views made)."""
        return [p.data_ptr() for p in self._key_params]

    def _host_pointers(self) -> list[int]:
        return [h.data_ptr() for h in self._host_tensors()]

    def _host_tensors(self) -> list[torch.Tensor]:
        """Each stack's host tensor in storage layout: ``[j]`` is expert ``j``'s slice."""
        return [s.storage() for s in self.weights.stacks()]

    def refresh(self) -> None:
        """After ``model.to(...)``/``.half()``: bring moved or cast experts back to host memory.

        Moving the model moves the expert parameters too (for a moment the experts occupy the
        target device); they are copied back into (pinned) host memory, the slots are reallocated
        in the new dtype and the cache starts cold. Move the model *before* optimizing to avoid it.
        """
        if all(s.is_current(full=True) and s.storage().device.type == "cpu" for s in self.weights.stacks()):
            if all(t.dtype == h.dtype for t, h in zip(self._slots, self._host_tensors(), strict=True)):
                return
        moved_to = next((s.params[0].device for s in self.weights.stacks() if s.params[0].device.type != "cpu"), None)
        if moved_to is not None:
            self.device = moved_to
            self.home_device = moved_to  # the whole model was moved there: restore() leaves it there
        self._home()
        self._alloc_slots()
        self._checked_key = None

    def release(self) -> None:
        """Undo the cache (``hf_moe_opt.restore``): free the slots; experts that lived on an
        accelerator before optimizing go back there, experts that lived on the CPU stay in host memory."""
        self._slots = []
        self._views = None
        self._slot_of = {}
        self._checked_key = None
        self.policy.reset()
        if self.home_device.type != "cpu":
            with torch.no_grad():
                for stack in self.weights.stacks():
                    stack.set_storage(stack.storage().to(self.home_device))

    def clear(self) -> None:
        """Empty the cache (the next steps start cold); statistics are kept."""
        if self._reads is not None:
            self._reads.catch_up(wait=True)  # steps queued one late are counted before the slots empty
        self.policy.reset()
        self._reset_table()

    def weights_changed(self) -> None:
        """The host copy was written in place (``load_state_dict``), or parameters were re-pointed
        (``p.data = ...``, gathered into the host copy again): every slot is stale, start cold."""
        self.refresh()  # a no-op unless a parameter was re-pointed
        self._checked_key = None
        self.clear()

    # ----------------------------------------------------------------- stats
    def reset_stats(self) -> None:
        """Zero the counters; the cache contents stay."""
        if self._reads is not None:
            self._reads.catch_up(wait=True)  # steps queued before the reset are counted before it
        if hasattr(self, "_pending"):
            self._resolve_events(wait=True)
        self._steps = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._chunked_steps = 0
        self._prefetches = 0
        self._prefetch_hits = 0
        self._bytes = 0
        self._copy_ms = 0.0
        self._stall_ms = 0.0
        self._host_ms = 0.0
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        if self._reads is not None:
            self._reads.reset_stats()

    def _resolve_events(self, wait: bool) -> None:
        keep = []
        for kind, start, end in self._pending:
            if not wait and not end.query():
                keep.append((kind, start, end))
                continue
            end.synchronize()
            ms = max(0.0, start.elapsed_time(end))
            if kind == "copy":
                self._copy_ms += ms
            else:
                self._stall_ms += ms
        self._pending = keep

    def stats(self) -> dict:
        """Counters since the last :meth:`reset_stats` and the experts resident now.

        Keys: ``policy``, ``num_slots``, ``num_experts``, ``pinned_experts``, ``steps``, ``hits``,
        ``misses`` (= loads), ``hit_rate``, ``evictions``, ``chunked_steps`` (steps that needed more
        unpinned experts than unpinned slots), ``bytes_copied``, ``copy_time_ms`` (from the copy
        stream reaching each load batch to its end: the transfers plus the host's submission of the
        batch, which the stream may reach first; a profiler trace gives the transfers alone, see
        :func:`hf_moe_opt.benchmarking.copy_trace.h2d_copies`), ``stall_time_ms`` (time the compute
        waited for copies), ``resident`` (sorted expert ids), ``device``, ``host_pinned``,
        ``slot_bytes``, ``prefetched`` (loads made ahead by the look-ahead, see
        :meth:`enable_prefetch`; their bytes are in ``bytes_copied``), ``prefetch_hits`` (needed
        experts that a look-ahead had loaded just before the step), and ``host_time_ms``: wall time
        the layer's calls spent in the cache on the host (the read of the router's choices with its
        wait for the device, the policy, issuing copies and the expert kernels; on a CPU the copies
        and the compute themselves; after a replayed decode step, the policy's work on its choices).
        Against a resident layer's time per call, it tells a host-bound
        decode step from one that waits for copies (``stall_time_ms``).
        """
        if self._reads is not None:
            self._reads.catch_up(wait=True)  # the policy takes every step queued so far
        self._resolve_events(wait=True)
        accesses = self._hits + self._misses
        reads = self._reads
        return {
            "policy": self.policy.name,
            "num_slots": self.num_slots,
            "num_experts": self.num_experts,
            "pinned_experts": list(self.policy.pinned),
            "steps": self._steps,
            "hits": self._hits,
            "misses": self._misses,
            "hit_rate": self._hits / accesses if accesses else 0.0,
            "evictions": self._evictions,
            "chunked_steps": self._chunked_steps,
            "bytes_copied": self._bytes,
            "copy_time_ms": self._copy_ms,
            "stall_time_ms": self._stall_ms,
            "resident": sorted(self.policy.resident),
            "device": str(self.device),
            "host_pinned": self.host_pinned,
            "slot_bytes": self.slot_nbytes,
            "prefetched": self._prefetches,
            "prefetch_hits": self._prefetch_hits,
            "host_time_ms": self._host_ms,
            "cache_misses": "copy" if reads is None else "read",
            "host_reads": 0 if reads is None else reads.host_reads,
            "host_read_bytes": 0 if reads is None else reads.host_read_bytes,
        }

    # ----------------------------------------------------------------- copies
    def _issue(self, loads: list[Load], after: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        """Copy ``loads`` into their slots; on CUDA asynchronously, returning the completion event.

        The copies wait for the compute queued so far (it may read the victims' slots), or, with
        ``after``, only for that event (a prefetch: the victims were last read by this layer's own
        compute, recorded in ``after``, not by the layer running now)."""
        hosts = self._host_tensors()
        nbytes = self.expert_nbytes * len(loads)
        self._bytes += nbytes
        table = self._table_np
        for ld in loads:
            if ld.evicted is not None:
                self._slot_of.pop(ld.evicted, None)
                table[ld.evicted] = self.num_slots
                self._evictions += 1
            self._slot_of[ld.expert] = ld.slot
            table[ld.expert] = ld.slot
        self._table_stale = True
        # (slot, host) slices built before the clock starts: a copy's time is the transfer, not Python.
        with torch.no_grad():
            pairs = [
                (slot[ld.slot], host[ld.expert]) for ld in loads for slot, host in zip(self._slots, hosts, strict=True)
            ]
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            copy_pairs(pairs)
            ms = (time.perf_counter() - t0) * 1e3
            self._copy_ms += ms
            self._stall_ms += ms  # nothing runs beside a CPU copy
            return None
        stream = _copy_stream(self.device)
        # The victims' slots may still be read by compute queued before this point.
        if after is None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            stream.wait_event(after)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            copy_pairs(pairs, non_blocking=True)
            end.record(stream)
        self._pending.append(("copy", start, end))
        return end

    def _wait(self, done: torch.cuda.Event | None) -> None:
        if done is None:
            return
        compute = torch.cuda.current_stream(self.device)
        mark = torch.cuda.Event(enable_timing=True)
        mark.record(compute)
        compute.wait_event(done)
        self._pending.append(("stall", mark, done))

    # ---------------------------------------------------------------- compute
    def _full_table(self) -> torch.Tensor:
        """The device slot map of every resident expert, brought up to date after loads."""
        if self._table_stale:
            self._table.copy_(self._table_host, non_blocking=True)
            self._table_stale = False
        return self._table

    def _group_tables(self, maps: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """``[G, E + 1]`` slot maps from ``(experts, their slots)`` per group; ``S`` for every other expert."""
        tables = np.full((len(maps), self.num_experts + 1), self.num_slots, dtype=np.int64)
        for g, (experts, slots) in enumerate(maps):
            tables[g, experts] = slots
        return torch.from_numpy(tables).to(self.device, non_blocking=True)

    def run(
        self, x: torch.Tensor, plan: DispatchPlan, ffn_for: FfnFactory, activation: Activation, out_scale: float
    ) -> torch.Tensor:
        """The experts over a dispatch plan: the plan's choices, back in assignment order, through
        :meth:`run_routed` (the layer calls that directly and never builds a plan over all experts)."""
        expert = torch.empty_like(plan.expert)
        expert[plan.order] = plan.expert  # order is a permutation: one writer per entry
        gate = torch.empty_like(plan.gate)
        gate[plan.order] = plan.gate
        shape = (plan.num_tokens, plan.top_k)
        keep = (expert < plan.num_experts).view(shape) if plan.may_drop else None
        return self.run_routed(x, expert.view(shape), gate.view(shape), keep, "", ffn_for, activation, out_scale)

    def run_routed(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        gates: torch.Tensor,
        keep: torch.Tensor | None,
        backend: str,
        ffn_for: FfnFactory,
        activation: Activation,
        out_scale: float,
    ) -> torch.Tensor:
        start = time.perf_counter()
        self._follow(x)
        reads = self._reads
        if reads is not None:
            out = reads.run(x, expert_index, gates, keep, backend, activation, out_scale)
            if out is not None:
                self._host_ms += (time.perf_counter() - start) * 1e3
                return out
            reads.catch_up(wait=True)  # a call the decode kernels do not take: the policy catches up first
        num_experts = self.num_experts
        # Dropped assignments look up entry E of the slot maps, which is always S (outside every group).
        key = expert_index if keep is None else torch.where(keep, expert_index, num_experts)
        self._top_k = expert_index.shape[1]
        nxt = self._chain(x.device) if self.prefetch else None
        guess = nxt._guess(x) if nxt is not None and key.numel() <= HOST_CHOICES_MAX else None
        needed, counts, predicted = self._needed(key, guess)
        if self._prefetched:
            self._take_prefetch(needed)
        if self._unwaited and not self._unwaited.isdisjoint(needed):
            torch.cuda.current_stream(self.device).wait_event(self._unwaited_done)
            self._unwaited, self._unwaited_done = set(), None
        out = self._step(x, expert_index, key, gates, keep, needed, counts, backend, ffn_for, activation, out_scale)
        if self.prefetch and self.device.type == "cuda":
            self._last_compute = torch.cuda.Event()
            self._last_compute.record(torch.cuda.current_stream(self.device))
        if predicted:
            nxt._prefetch_for_next_step(predicted)
        if reads is not None:
            reads.after_copy_step()
        self._host_ms += (time.perf_counter() - start) * 1e3
        return out

    def _step(self, x, expert_index, key, gates, keep, needed, counts, backend, ffn_for, activation, out_scale):
        """The policy's step for ``needed`` experts, its copies and the compute (see the module docs)."""
        num_slots = self.num_slots
        outcome = self.policy.step(needed, counts)
        self._steps += 1
        self._hits += len(outcome.hits)
        self._misses += len(outcome.misses)
        if len(outcome.chunks) > 1:
            self._chunked_steps += 1
        if not needed:
            return torch.zeros_like(x)
        weights = self._slot_tensors()
        # Autograd keeps the weights each group ran with, and later loads (this step's next chunk, the
        # next step) write the slots in place: with gradients on, each group computes on a copy.
        grads = records_grad(x, gates)
        # The resident layer's plan-free decode kernels, over the slots (not for run(plan): no backend).
        found = supported_direct_ffn(backend, x, lambda: weights, activation) if backend else None
        direct = found[0] if found is not None else None

        mixed = outcome.hits and outcome.loads
        if len(outcome.chunks) == 1 and (not mixed or key.numel() < OVERLAP_MIN_ASSIGNMENTS):
            # One group: every needed expert is resident once this step's loads (if any) are in.
            if outcome.loads:
                self._wait(self._issue(list(outcome.loads)))
            # The decode kernels look each expert's slot up themselves; a plan is built over the slots.
            table = self._full_table()
            if grads:
                weights = _copies(weights)
            out = self._experts(x, key, gates, keep, direct, ffn_for, weights, activation, out_scale, table)
            self._resolve_if_many()
            return out

        # Groups computed one after another: the hits first (they need no copy), then each chunk's loads.
        groups: list[tuple[list[int], list[Load]]] = []
        for c, chunk in enumerate(outcome.chunks):
            loads = [ld for ld in outcome.loads if ld.chunk == c]
            loaded = {ld.expert for ld in loads}
            ready = [e for e in chunk if e not in loaded]
            if ready:
                groups.append((ready, []))
            if loads:
                groups.append(([e for e in chunk if e in loaded], loads))
        # Each group's slot map, as the slots will hold it when the group runs: hits where they are now
        # (a step never evicts its hits), loaded experts where their loads put them. One copy for all.
        maps = []
        for experts, loads in groups:
            slot_of = {ld.expert: ld.slot for ld in loads} if loads else self._slot_of
            maps.append((experts, [slot_of[e] for e in experts]))
        tables = self._group_tables(maps)

        events: dict[int, torch.cuda.Event | None] = {}
        if len(groups) > 1 and not groups[0][1] and groups[1][1] and groups[1][1][0].chunk == 0:
            events[1] = self._issue(groups[1][1])  # start the misses' copies before computing the hits
        num_tokens, top_k = expert_index.shape
        if direct is None:
            # Each group runs over the assignments as top-1 "tokens"; the per-assignment outputs are
            # summed (each is non-zero in exactly one group), then the k slots combine as the resident
            # layer does: bit for bit its result.
            x = x if top_k == 1 else x.repeat_interleave(top_k, dim=0)
            key, gates = key.reshape(-1, 1), gates.reshape(-1, 1)
        acc = None
        for g, (_, loads) in enumerate(groups):
            if loads:
                if g not in events:
                    events[g] = self._issue(loads)
                self._wait(events[g])
            slots = tables[g][key]
            used = _copies(weights) if grads else weights
            y = self._experts(x, slots, gates, slots < num_slots, direct, ffn_for, used, activation, out_scale)
            acc = y if acc is None else acc + y
        self._resolve_if_many()
        if direct is not None or top_k == 1:
            return acc
        return acc.view(num_tokens, top_k, -1).sum(dim=1)

    def _follow(self, x: torch.Tensor) -> None:
        """Slots on the input's device, and the host copy of experts moved behind the store's back brought back."""
        if "_copied" in self.__dict__:
            self._rebuild_copy()
        if x.device != self.device:
            # The dense parts were moved after optimizing: follow the input (and pin for a GPU).
            self.device = x.device
            if self.home_device.type != "cpu":
                self.home_device = x.device  # restore() brings the experts to where the model now is
            if self.device.type == "cuda" and self.pin_memory and not self.host_pinned:
                self._home()
            self._alloc_slots()
        key = self._weights_key()
        if key != self._checked_key:
            if not all(s.is_current() for s in self.weights.stacks()):
                self.refresh()
            elif self._host_pointers() != self._slots_from:
                # Fused experts re-pointed (p.data = ...): read from the parameter, they are "current",
                # but the slots hold the old data and the host copy may be unpinned: home it, start cold.
                self._home()
                self.clear()
                self._slots_from = self._host_pointers()
            self._checked_key = self._weights_key()

    def _needed(self, key: torch.Tensor, guess: torch.Tensor | None) -> tuple[list[int], list[int], list[int]]:
        """The experts a call routes to (ascending), their assignment counts and the experts ``guess``
        predicts for the next cached layer, read on the host.

        This is the one host synchronisation of a cached layer call, and it is inherent to a cache:
        which experts to copy is a host decision. A few assignments are read as they are (with the
        guess, in the same copy); more are counted per expert on the device first, so that the host
        reads ``E`` numbers at most.
        """
        num_experts = self.num_experts
        if key.numel() <= HOST_CHOICES_MAX:
            flat = key.reshape(-1)
            predicted: list[int] = []
            if guess is None:
                choices = flat.tolist()
            else:
                both = torch.cat([flat, guess.reshape(-1).to(flat.dtype)]).tolist()
                choices, predicted = both[: flat.numel()], sorted(set(both[flat.numel() :]))
            tally: dict[int, int] = {}
            for e in choices:
                tally[e] = tally.get(e, 0) + 1
            tally.pop(num_experts, None)  # dropped assignments
            needed = sorted(tally)
            return needed, [tally[e] for e in needed], predicted
        flat = key.reshape(-1).long()
        hist = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
        per_expert = hist.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts].tolist()
        needed = list(compress(self._expert_ids, per_expert))
        return needed, [per_expert[e] for e in needed], []

    # ------------------------------------------------------------ host reads
    @property
    def read_behind(self) -> HostReads | None:
        """The read-behind state (:meth:`enable_host_reads`), or None in the default mode."""
        return self._reads

    @property
    def capturable(self) -> bool:
        """Whether a decode call (up to ``host_reads.STEP_MAX_TOKENS`` tokens) can run inside a captured
        decode step (read-behind mode only)."""
        return self._reads is not None

    def enable_host_reads(self) -> None:
        """Read-behind mode (``cache_misses="read"``): one-token calls on the Triton backend read
        missing experts from pinned host memory and never wait for the host; the policy runs one
        step behind and copies experts into slots for later steps (:mod:`hf_moe_opt.cache.host_reads`).

        Raises:
            ValueError: the look-ahead is on, or the cache serves a GPU from memory that is not pinned.
        """
        if self.prefetch:
            raise ValueError('cache_misses="read" cannot be combined with the look-ahead (cache_prefetch=True)')
        if self.device.type == "cuda" and not self.host_pinned:
            raise ValueError(
                'cache_misses="read" needs the experts in pinned host memory, which the GPU can read; '
                f"pinning failed: {self.pin_error}"
            )
        if self._reads is None:
            self._reads = HostReads(self)

    # ------------------------------------------------------------- look-ahead
    def enable_prefetch(self, router: nn.Module | None, chain: dict | None = None) -> bool:
        """Load this layer's likely experts while the cached layer before it computes (look-ahead).

        That layer applies this layer's router weights (``router`` or its ``classifier``: an
        ``[E, D]`` linear map) to its own input, takes the top-k experts per token and, once its own
        step is queued, has this store load the ones not resident, evicting by the policy among the
        others (:meth:`EvictionPolicy.prefetch`). The copies then overlap with that layer's compute
        and whatever runs in between (attention, dense layers). Which layer runs before which is
        learned from the calls. A wrong guess costs a copy and may evict an expert that was needed;
        outputs never change. Decode-sized calls only (at most :data:`HOST_CHOICES_MAX` assignments).
        Returns whether a router weight was found (without one, the layer can still prefetch for the
        next, but nothing prefetches for it).

        ``chain`` is where the stores that may follow each other record which ran last on a device:
        one dict shared by the stores of one model (``optimize`` passes one per call), so the layers
        of two models whose calls interleave on a GPU never prefetch into each other's slots. None:
        a chain shared by the whole process.
        """
        if self._reads is not None:
            raise ValueError('the look-ahead cannot be combined with cache_misses="read"')
        self.prefetch = True
        self._chain_of = _LAST_STORE if chain is None else chain
        self._predictor = None
        for module in (getattr(router, "classifier", None), router):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == self.num_experts:
                self._predictor = module
                break
        return self._predictor is not None

    def _chain(self, device: torch.device) -> CachedExpertStore | None:
        """Record this store as the successor of the one that ran last; the store to prefetch for."""
        chain = self._chain_of
        ref = chain.get(device)
        prev = ref() if ref is not None else None
        if prev is not None and prev is not self:
            prev._next = weakref.ref(self)
        chain[device] = weakref.ref(self)
        nxt = self._next() if self._next is not None else None
        if nxt is None or not nxt.prefetch or nxt._predictor is None or not nxt._top_k:
            return None
        return nxt

    def _guess(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[N, k]`` experts this layer's router would pick for ``x`` (another layer's input), or None."""
        weight = self._predictor.weight
        if x.shape[-1] != weight.shape[1] or x.device != weight.device:
            return None
        bias = getattr(self._predictor, "bias", None)
        logits = nn.functional.linear(x.to(weight.dtype), weight, bias if isinstance(bias, torch.Tensor) else None)
        return logits.topk(min(self._top_k, logits.shape[-1]), dim=-1).indices

    def _prefetch_for_next_step(self, experts: list[int]) -> None:
        loads = self.policy.prefetch(experts)
        if not loads:
            return
        self._prefetches += len(loads)
        done = self._issue(list(loads), after=self._last_compute)
        self._prefetched = self._prefetched | {ld.expert for ld in loads}
        self._prefetch_done = done if done is not None else self._prefetch_done

    def _take_prefetch(self, needed: list[int]) -> None:
        """Order this step's compute after the prefetch copies if it needs one of their experts (stall
        time); otherwise the compute goes on beside them and the first later step that needs one of
        those experts waits (``run_routed``)."""
        used = self._prefetched.intersection(needed)
        self._prefetch_hits += len(used)
        done = self._prefetch_done
        if done is None:  # copied synchronously (no CUDA)
            pass
        elif used:
            self._wait(done)  # the copy stream runs in order: every earlier prefetch is in too
            self._unwaited, self._unwaited_done = set(), None
        else:
            self._unwaited |= self._prefetched
            self._unwaited_done = done
        self._prefetched = frozenset()
        self._prefetch_done = None

    def _experts(
        self, x, slots, gates, keep, direct, ffn_for, weights, activation, out_scale, slot_map=None
    ) -> torch.Tensor:
        """The experts of ``slots`` (``[N, k]`` slot ids, ``S`` where ``keep`` is False) over the slot
        tensors; with ``slot_map`` (``[E + 1]``), ``slots`` holds expert ids and ``slot_map`` their slots."""
        w1, b1, w2, b2 = weights
        if direct is not None:
            return direct(x, slots, gates, keep, w1, b1, w2, b2, activation, out_scale, slot_map=slot_map)
        if slot_map is not None:
            slots = slot_map[slots]
        plan = make_plan(slots, gates, keep, self.num_slots)
        return ffn_for(x.device, plan.num_rows)(x, plan, w1, b1, w2, b2, activation, out_scale)

    def _resolve_if_many(self) -> None:
        if len(self._pending) > _MAX_PENDING_EVENTS:
            self._resolve_events(wait=False)


def _copies(tensors: tuple) -> tuple:
    return tuple(None if t is None else t.clone() for t in tensors)
