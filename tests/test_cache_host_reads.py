"""Read-behind caching (``cache_misses="read"``): one-token steps read missing experts from their host
copy through the decode kernels' offset table and never wait for the host; the policy sees every
step once, in order, one step late; outputs equal the resident layer's."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.cache import CachedExpertStore, make_policy

from .models import tiny_switch
from .test_cache_fast_path import _first_layers

pytest.importorskip("triton")
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
NUM_EXPERTS = 8


def _models(family: str, slots: int, policy: str, capacity: str, expert_capacity: int = 64, **cache):
    """First MoE layers: resident, and a read-behind cached copy (Triton backend)."""
    return _first_layers(family, slots, policy, capacity, expert_capacity, "triton", cache_misses="read", **cache)


def _inputs(d_model: int, steps: int, seed: int, long_every: int = 0) -> list[torch.Tensor]:
    """One-token steps over a few prototypes (hits are common) with fresh ones between, and with
    ``long_every``, a several-token call now and then (the default path)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(5, d_model, generator=g)
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        if long_every and i % long_every == long_every - 1:
            h = torch.randn(2, rng.choice([1, 4]), d_model, generator=g)
        elif rng.random() < 0.75:
            h = (protos[rng.randrange(5)] + 0.01 * torch.randn(d_model, generator=g)).view(1, 1, d_model)
        else:
            h = torch.randn(1, 1, d_model, generator=g)
        out.append(h.to(DEVICE))
    return out


def _record_choices(store: CachedExpertStore) -> list[tuple[bool, list[int], list[int]]]:
    """Per call: whether it was a one-token call, and the experts it needs with their counts."""
    calls = []
    inner = store.run_routed

    def recording(x, expert_index, gates, keep, *args):
        idx = expert_index if keep is None else torch.where(keep, expert_index, store.num_experts)
        tally: dict[int, int] = {}
        for e in idx.reshape(-1).tolist():
            if e != store.num_experts:
                tally[e] = tally.get(e, 0) + 1
        calls.append((x.shape[0] == 1, sorted(tally), [tally[e] for e in sorted(tally)]))
        return inner(x, expert_index, gates, keep, *args)

    store.run_routed = recording
    return calls


def _count_calls(store: CachedExpertStore) -> list[int]:
    """``[calls]`` of the store, counted without reading any tensor (replays refuse host reads)."""
    count = [0]
    inner = store.run_routed

    def counting(*args):
        count[0] += 1
        return inner(*args)

    store.run_routed = counting
    return count


def _count_steps(reads) -> list[int]:
    """``[steps]`` a read-behind cache hands its policy: eager calls, and each replay of a captured one."""
    from hf_moe_opt.cache.host_reads import _capturing

    count = [0]
    run, after_replay = reads.store.run_routed, reads.after_replay

    def counting_run(*args):
        count[0] += not _capturing()
        return run(*args)

    def counting_replay(tokens):
        count[0] += 1
        return after_replay(tokens)

    reads.store.run_routed, reads.after_replay = counting_run, counting_replay
    return count


def _assert_same(want: torch.Tensor, got: torch.Tensor) -> None:
    if DEVICE.type == "cpu":
        assert torch.equal(want, got)
    else:  # compiled, the kernels with and without an offset table may fuse multiply-adds differently
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "family,slots,policy,capacity,expert_capacity,long_every",
    [
        ("switch", 3, "lru", "none", 64, 0),
        ("nllb", 3, "adaptive", "none", 64, 7),
        ("nllb", 1, "lfu", "none", 64, 0),  # top-2 never fits one slot: oversubscribed policy steps
        ("switch", 2, "lifo", "model", 1, 5),  # the router drops assignments
    ],
)
def test_read_behind_is_exact_and_the_policy_sees_every_step_once(
    family, slots, policy, capacity, expert_capacity, long_every
):
    resident, cached = _models(family, slots, policy, capacity, expert_capacity)
    store = cached.store
    assert store.stats()["cache_misses"] == "read"
    calls = _record_choices(store)
    d_model = cached.weights.w1.tensor.shape[2]
    with torch.no_grad():
        pairs = [(resident(h), cached(h)) for h in _inputs(d_model, 24, seed=slots, long_every=long_every)]
    for want, got in pairs:  # compared after the run: no host read between the steps
        _assert_same(want, got)
    stats = store.stats()  # the policy catches up with the queued steps here

    # A policy fed every call's needs in order reaches the same state and counts. On the CPU copies
    # finish at once, so a one-token step reads from host memory exactly the experts that the policy,
    # one step behind, did not hold when the step ran.
    shadow = make_policy(policy, slots, NUM_EXPERTS)
    hits = misses = host_reads = 0
    for one_token, needed, counts in calls:
        if one_token:
            host_reads += sum(c for e, c in zip(needed, counts, strict=True) if e not in shadow.resident)
        outcome = shadow.step(needed, counts)
        hits, misses = hits + len(outcome.hits), misses + len(outcome.misses)
    assert (stats["steps"], stats["hits"], stats["misses"]) == (len(calls), hits, misses)
    assert stats["resident"] == sorted(shadow.resident)
    assert misses > 0 and host_reads > 0
    if DEVICE.type == "cpu":
        assert stats["host_reads"] == host_reads
    else:  # copies (and choices) land when the GPU gets there: the policy may lag more than one step
        assert stats["host_reads"] > 0
    assert stats["host_read_bytes"] == stats["host_reads"] * store.expert_nbytes


class _SlowCopies:
    """Copies that take ``lag`` later queries to land, as the copy stream runs them on a GPU: from
    the moment a load is issued its slot holds garbage (NaN) until its event has completed, and the
    copies complete in issue order. A kernel that read a slot too early would return NaN."""

    def __init__(self, store: CachedExpertStore, lag: int) -> None:
        self.store, self.lag, self.pending = store, lag, []  # [(event, [(slot, expert)])]
        self.issued = self.completed = 0
        inner = store._issue

        def issue(loads, after=None):
            inner(loads, after)  # the bookkeeping (and on the CPU the copies themselves)
            writes = [(ld.slot, ld.expert) for ld in loads]
            self._garble([s for s, _ in writes])
            event = _FakeEvent(self, self.issued)
            self.issued += 1
            self.pending.append((event, writes))
            return event

        store._issue = issue
        # The default path's compute waits for its loads (on a GPU, the stream waits on the event).
        store._wait = lambda done: done.synchronize() if done is not None else None

    def _garble(self, slots: list[int]) -> None:
        for t in self.store._slots:
            t[slots] = float("nan")

    def complete(self, upto: int) -> None:
        """Land every copy issued before ``upto`` (in order); slots still awaiting a later copy stay garbage."""
        while self.pending and self.pending[0][0].index < upto:
            _, writes = self.pending.pop(0)
            self.completed += 1
            waiting = {s for _, w in self.pending for s, _ in w}
            homes = self.store._host_tensors()
            for slot, expert in writes:
                if slot not in waiting:
                    for t, home in zip(self.store._slots, homes, strict=True):
                        t[slot] = home[expert]


class _FakeEvent:
    def __init__(self, copies: _SlowCopies, index: int) -> None:
        self.copies, self.index, self.queries = copies, index, 0

    def query(self) -> bool:
        self.queries += 1
        if self.queries > self.copies.lag:
            self.copies.complete(self.index + 1)
        return self.index < self.copies.completed

    def synchronize(self) -> None:
        self.copies.complete(self.index + 1)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="emulates the copy stream on the CPU")
@pytest.mark.parametrize("family,slots,lag", [("nllb", 3, 4), ("nllb", 2, 1)])
def test_no_step_reads_a_slot_while_its_copy_is_in_flight(family, slots, lag):
    resident, cached = _models(family, slots, "lru", "none")
    store = cached.store
    copies = _SlowCopies(store, lag)
    d_model = cached.weights.w1.tensor.shape[2]
    with torch.no_grad():
        for h in _inputs(d_model, 30, seed=lag, long_every=9):
            _assert_same(resident(h), cached(h))
    stats = store.stats()
    assert copies.issued > 5 and copies.completed == copies.issued
    assert stats["host_reads"] > 0 and sorted(store._reads._ready) == stats["resident"]


def test_the_offset_table_points_at_slots_once_their_copies_are_in():
    _, cached = _models("nllb", 3, "lru", "none")
    store = cached.store
    reads = store._reads
    d_model = cached.weights.w1.tensor.shape[2]
    with torch.no_grad():
        for h in _inputs(d_model, 12, seed=3):
            cached(h)
    store.stats()  # every queued step applied, every copy waited for
    table = reads.offsets.w1.tolist()
    for e in range(NUM_EXPERTS):
        slot = store.policy.slot_of(e)
        if slot is None:
            assert table[e] == reads._host[0, e]
        else:
            assert table[e] == slot * store._slot_tensors()[0].stride(0)
    assert reads._ready == store.policy.resident
    table, step_bufs = reads._table, dict(reads._step_bufs)
    store.clear()  # cold: everything read from its host copy again
    assert reads.offsets.w1.tolist()[:NUM_EXPERTS] == reads._host[0, :NUM_EXPERTS].tolist()
    assert not store.policy.resident and not reads._ready
    # A captured step keeps reading the same device buffers: they are rewritten, never replaced.
    assert reads._table is table and reads._step_bufs == step_bufs and 1 in step_bufs


def test_reset_stats_and_clear_keep_outputs_exact():
    resident, cached = _models("switch", 2, "adaptive", "none")
    store = cached.store
    d_model = cached.weights.w1.tensor.shape[2]
    with torch.no_grad():
        inputs = _inputs(d_model, 14, seed=9, long_every=6)
        for i, h in enumerate(inputs):
            if i == 8:
                store.reset_stats()
            if i == 10:
                store.clear()
            _assert_same(resident(h), cached(h))
    stats = store.stats()
    assert 0 < stats["steps"] < len(inputs) and stats["host_reads"] > 0


def test_clear_counts_the_steps_still_queued():
    # Read-behind steps reach the policy one step late; clear() empties the slots but keeps the
    # statistics, so the steps queued before it are counted, not dropped.
    _, cached = _models("switch", 2, "lru", "none")
    store = cached.store
    d_model = cached.weights.w1.tensor.shape[2]
    inputs = _inputs(d_model, 9, seed=21)
    with torch.no_grad():
        for h in inputs[:5]:
            cached(h)
        assert store._reads._queued  # the last step waits for the next call
        store.clear()
        assert not store._reads._queued and not store.policy.resident
        for h in inputs[5:]:
            cached(h)
    assert store.stats()["steps"] == len(inputs)


def test_a_copied_read_behind_cache_reads_its_own_host_copy():
    # The offset table holds host addresses: a deep copy must read its own experts (and stay exact
    # once the original is gone), not the original's. Fused expert tensors (Mixtral) are copied as
    # they are, so nothing else notices the move.
    from .test_families import tiny_model

    base = tiny_model("mixtral").eval().to(DEVICE)
    cached = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
        hf_moe_opt.optimize(cached, backend="triton", expert_cache=3, cache_policy="lru", cache_misses="read")
    g = torch.Generator().manual_seed(23)
    steps = [torch.randint(3, 64, (1, 1), generator=g).to(DEVICE) for _ in range(12)]
    with torch.no_grad():
        for ids in steps[:4]:
            cached(input_ids=ids)
        twin = copy.deepcopy(cached)
        del cached
        for ids in steps:
            torch.testing.assert_close(twin(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for _, layer in hf_moe_opt.optimized_layers(twin):
        store = layer.store
        slots, home = store._slot_tensors()[0], store._host_views()[0]
        # Expert 0's offset from the copy's own slot base to its own host copy.
        assert store._reads._host[0, 0] == (home.data_ptr() - slots.data_ptr()) // home.element_size()
        assert store.stats()["steps"] >= len(steps)


def test_bad_settings_raise():
    base = tiny_switch(num_experts=NUM_EXPERTS).to(DEVICE)
    with pytest.raises(ValueError, match="cache_misses must be one of"):
        hf_moe_opt.optimize(copy.deepcopy(base), expert_cache=2, cache_misses="stream")
    with pytest.raises(ValueError, match="cache_prefetch"):
        hf_moe_opt.optimize(copy.deepcopy(base), expert_cache=2, cache_misses="read", cache_prefetch=True)
    with pytest.raises(ValueError, match="only with expert_cache"):
        hf_moe_opt.optimize(copy.deepcopy(base), cache_misses="read")
    _, cached = _models("switch", 2, "lru", "none")
    with pytest.raises(ValueError, match="look-ahead"):
        cached.store.enable_prefetch(None)


def test_copy_mode_reports_no_host_reads():
    base = tiny_switch(num_experts=NUM_EXPERTS).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hf_moe_opt.optimize(base, expert_cache=2, backend="triton")
    layer = hf_moe_opt.optimized_layers(base)[0][1]
    with torch.no_grad():
        layer(torch.randn(1, 1, layer.weights.w1.tensor.shape[2], device=DEVICE))
    stats = layer.store.stats()
    assert stats["cache_misses"] == "copy" and stats["host_reads"] == 0 and stats["misses"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: copies racing the kernels that read slots")
def test_large_experts_with_copies_in_flight_stay_exact():
    """Experts large enough that a copy outlasts a decode step, few slots, many evictions: no step
    reads a slot whose copy is in flight or whose victim is being overwritten."""
    from hf_moe_opt.cache import store as cache_store

    torch.manual_seed(0)
    experts, d, f = 16, 1024, 4096  # 16 MiB per bfloat16 expert
    w1 = torch.randn(experts, f, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    w2 = torch.randn(experts, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5
    from hf_moe_opt.experts.activation import Activation
    from hf_moe_opt.experts.weights import ExpertWeights
    from hf_moe_opt.kernels.gemv import gemv_moe_ffn

    weights = ExpertWeights.from_fused(torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone()))
    store = cache_store.CachedExpertStore(weights, 3, "cuda", policy="lru")
    store.enable_host_reads()
    act = Activation("relu", torch.relu)
    outs, refs = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = torch.randn(1, d, generator=g).to("cuda", torch.bfloat16)
        index = torch.randperm(experts, generator=g)[:2].view(1, 2).to("cuda")
        gates = torch.rand(1, 2, generator=g).to("cuda")
        outs.append(store.run_routed(x, index, gates, None, "triton", None, act, 1.0))
        refs.append(gemv_moe_ffn(x, index, gates, None, w1, None, w2, None, act))
    torch.cuda.synchronize()
    for want, got in zip(refs, outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = store.stats()
    assert stats["misses"] > 20 and stats["host_reads"] > 0


# -- whole decode steps in graphs (cuda_graphs="step") --------------------------------------------


def _step_graph_pair(family: str, slots: int):
    """``(plain, graphed)``: resident ``optimize``, and a copy with a read-behind cache and step graphs."""
    from .test_families import tiny_model

    base = tiny_switch(num_experts=NUM_EXPERTS) if family == "switch" else tiny_model(family)
    base = base.to(DEVICE)
    plain, model = base, copy.deepcopy(base)
    hf_moe_opt.optimize(plain, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
        hf_moe_opt.optimize(model, backend="triton", expert_cache=slots, cache_misses="read", cuda_graphs="step")
    return plain, model


def _ids(model, batch: int, seq: int = 7, seed: int = 0) -> torch.Tensor:
    from .models import VOCAB

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g).to(DEVICE)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU stand-in for graphs; CUDA graphs are tested below")
@pytest.mark.parametrize(
    ("family", "batch", "handover"), [("switch", 1, "step"), ("qwen3_moe", 1, "step"), ("switch", 3, "step"),
                                      ("switch", 3, "lag")])  # fmt: skip
def test_step_graphs_with_a_read_behind_cache_match_plain_generate(family, batch, handover, monkeypatch):
    """The decode steps replay (on the CPU: the eager stand-in, with every host read inside a step
    refused); the caches' policies take each replayed step's routing afterwards."""
    from hf_moe_opt.cache.host_reads import STEP_MAX_TOKENS
    from hf_moe_opt.step_graphs import EagerCapture, runner_of

    monkeypatch.setenv("HF_MOE_OPT_STEP_HANDOVER", handover)

    plain, model = _step_graph_pair(family, 2)
    runner = runner_of(model)
    runner.capture = EagerCapture()
    stores = [layer.store for _, layer in hf_moe_opt.optimized_layers(model)]
    calls = [_count_calls(store) for store in stores]
    ids = _ids(model, batch)
    new = 5
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        got = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(got, want)
    assert runner.counts["replays"] > 0 and runner.counts["fallbacks"] == 0
    for store, recorded in zip(stores, calls, strict=True):
        stats = store.stats()
        # Every call once: eager ones (prefill, warm-up) through the queue, replays through after_replay.
        assert stats["steps"] == recorded[0] > 0
    assert sum(store.stats()["host_reads"] for store in stores) > 0
    # More sequences per step than the decode kernels take: plain generate (read-behind, eager) with a warning.
    too_many = STEP_MAX_TOKENS + 1
    with torch.no_grad(), pytest.warns(UserWarning, match=f"at most {STEP_MAX_TOKENS} sequences per step"):
        out = model.generate(_ids(model, too_many), max_new_tokens=2, do_sample=False)
    assert out.shape[0] == too_many and runner.counts["fallbacks"] == 1


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU stand-in for graphs")
def test_step_graphs_with_a_read_behind_cache_and_beams_match_plain_generate():
    """Two prompts times three beams: six sequences per replayed step, each step's choices to the policies."""
    from hf_moe_opt.step_graphs import EagerCapture, runner_of

    plain, model = _step_graph_pair("switch", 2)
    runner = runner_of(model)
    runner.capture = EagerCapture()
    ids = _ids(model, 2, seed=4)
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=3)
        got = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=3)
    assert torch.equal(got, want)
    assert runner.counts["replays"] > 0 and runner.counts["fallbacks"] == 0
    assert sum(s["host_reads"] for s in hf_moe_opt.stats(model).values()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("family", "handover", "batch"), [
    ("switch", "step", 1), ("qwen3_moe", "step", 1), ("switch", "layer", 1), ("switch", "layer-early", 1),
    ("qwen3_moe", "layer-early", 1), ("switch", "step", 4), ("qwen3_moe", "layer-early", 3), ("switch", "lag", 1),
    ("qwen3_moe", "lag", 3), ("switch", "lag", 8)])  # fmt: skip
def test_cuda_step_graphs_with_a_read_behind_cache_match_plain_generate(family, handover, batch, monkeypatch):
    from hf_moe_opt.step_graphs import runner_of

    monkeypatch.setenv("HF_MOE_OPT_STEP_HANDOVER", handover)

    plain, model = _step_graph_pair(family, 2)
    reads = [layer.store.read_behind for _, layer in hf_moe_opt.optimized_layers(model)]
    calls = [_count_steps(r) for r in reads]
    ids = _ids(model, batch)
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        got = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        again = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want) and torch.equal(again, want)
    counts = runner_of(model).counts
    assert counts["replays"] > 0 and counts["fallbacks"] == 0
    # The policy took every eager call and every replayed step once (with ``lag``, the last step's
    # choices are still queued after generate: stats() takes them).
    assert [r.store.stats()["steps"] for r in reads] == [c[0] for c in calls]
    stats = hf_moe_opt.stats(model)
    assert sum(s["host_reads"] for s in stats.values()) > 0 and sum(s["misses"] for s in stats.values()) > 0
    # A per-layer hand-over gives each layer's choices over as soon as that layer has run: through pinned
    # memory and an event recorded in the graph (every decoding layer; encoder layers never replay).
    stepping = [bufs for r in reads for bufs in r._step_bufs.values()]
    assert stepping
    per_layer = handover in ("layer", "layer-early")
    assert all((bufs.done is not None and bufs.host is not None) == per_layer for bufs in stepping)


def test_step_handover_setting_is_checked(monkeypatch):
    from hf_moe_opt.cache.host_reads import HANDOVERS, _handover

    monkeypatch.delenv("HF_MOE_OPT_STEP_HANDOVER", raising=False)
    assert _handover() == "lag"
    for value in HANDOVERS:
        monkeypatch.setenv("HF_MOE_OPT_STEP_HANDOVER", value)
        assert _handover() == value
    monkeypatch.setenv("HF_MOE_OPT_STEP_HANDOVER", "layers")
    with pytest.raises(ValueError, match="HF_MOE_OPT_STEP_HANDOVER"):
        _handover()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU stand-in for graphs")
def test_step_graphs_with_a_read_behind_cache_on_the_torch_backend_fall_back():
    from hf_moe_opt.step_graphs import EagerCapture, runner_of

    model = tiny_switch(num_experts=NUM_EXPERTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hf_moe_opt.optimize(model, backend="torch", expert_cache=2, cache_misses="read", cuda_graphs="step")
    runner_of(model).capture = EagerCapture()
    with torch.no_grad(), pytest.warns(UserWarning, match="Triton backend only"):
        out = model.generate(_ids(model, 1), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and runner_of(model).counts["fallbacks"] == 1
