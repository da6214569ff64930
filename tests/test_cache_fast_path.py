"""The cached layer's step paths (one group over the persistent slot map; hits and loads in groups;
oversubscribed chunks) give the resident layer's output bit for bit on fresh inputs, and the policies'
all-hit shortcut serves a step exactly as the general path does."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.cache import POLICY_NAMES, CachedExpertStore, make_policy
from hf_moe_opt.cache import store as cache_store

from .models import tiny_nllb, tiny_switch

NUM_EXPERTS = 8
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _first_layers(
    family: str, slots: int, policy: str, capacity: str, expert_capacity: int, backend: str = "torch", **cache
):
    """The first MoE layer of a resident-optimized model and of a cached copy of the same model
    (``cache``: more ``optimize`` options for the cached one)."""
    if family == "switch":
        base = tiny_switch(num_experts=NUM_EXPERTS, expert_capacity=expert_capacity)
    else:
        # NLLB's eval capacity is a fraction of the tokens (1.0 drops nothing): lower it with the capacity.
        fraction = 0.3 if expert_capacity < 64 else 1.0
        base = tiny_nllb(
            num_experts=NUM_EXPERTS, expert_capacity=expert_capacity, moe_eval_capacity_token_fraction=fraction
        )
    base = base.to(DEVICE)
    resident, cached = base, copy.deepcopy(base)
    hf_moe_opt.optimize(resident, capacity=capacity, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
        hf_moe_opt.optimize(
            cached, capacity=capacity, backend=backend, expert_cache=slots, cache_policy=policy, **cache
        )
    return hf_moe_opt.optimized_layers(resident)[0][1], hf_moe_opt.optimized_layers(cached)[0][1]


def _inputs(d_model: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Decode-like steps (a few tokens, often the same prototypes again, so hits are common) mixed
    with fresh random batches and an occasional longer sequence (prefill, capacity drops)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(6, d_model, generator=g)
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        kind = rng.random()
        if kind < 0.6:
            batch = rng.choice([1, 1, 2, 3])
            idx = torch.tensor([rng.randrange(3) for _ in range(batch)])
            h = (protos[idx] + 0.01 * torch.randn(batch, d_model, generator=g)).view(batch, 1, d_model)
        elif kind < 0.9:
            h = torch.randn(rng.choice([1, 2, 4]), 1, d_model, generator=g)
        else:
            h = torch.randn(rng.choice([1, 2]), rng.choice([5, 9]), d_model, generator=g)
        out.append(h.to(DEVICE))
    return out


def _path(outcome) -> str:
    if len(outcome.chunks) > 1:
        return "chunked"
    if outcome.hits and outcome.loads:
        return "hits+loads"
    return "loads only" if outcome.loads else "hits only"


def _check_slot_map(store: CachedExpertStore) -> None:
    """The device slot map (after its lazy refresh) and the host mirror agree with the policy."""
    want = [store.num_slots] * (store.num_experts + 1)
    for e in store.policy.resident:
        want[e] = store.policy.slot_of(e)
    assert store._table_host.tolist() == want
    assert store._full_table().tolist() == want
    assert store._slot_of == {e: store.policy.slot_of(e) for e in store.policy.resident}


@pytest.mark.parametrize("family", ["switch", "nllb"])
@pytest.mark.parametrize(
    "slots,policy,capacity,expert_capacity",
    [
        (2, "lifo", "none", 64),
        (3, "lru", "none", 64),
        (1, "lfru", "none", 64),
        (5, "lfu", "none", 64),
        (NUM_EXPERTS, "fifo", "none", 64),
        (3, "lifo", "model", 2),  # the router drops assignments: plans with dropped rows
    ],
)
@pytest.mark.parametrize(
    "host_choices_max,overlap_min",
    [
        (cache_store.HOST_CHOICES_MAX, 0),  # choices read on the host; hits computed during the copies
        (0, 0),  # assignments counted per expert on the device first
        (cache_store.HOST_CHOICES_MAX, 1 << 20),  # every step waits for its copies, one group
    ],
)
def test_every_step_path_is_exact(
    family, slots, policy, capacity, expert_capacity, host_choices_max, overlap_min, monkeypatch
):
    monkeypatch.setattr(cache_store, "HOST_CHOICES_MAX", host_choices_max)
    monkeypatch.setattr(cache_store, "OVERLAP_MIN_ASSIGNMENTS", overlap_min)
    resident, cached = _first_layers(family, slots, policy, capacity, expert_capacity)
    store = cached.store
    assert isinstance(store, CachedExpertStore)
    paths: dict[str, int] = {}
    step = store.policy.step

    def recording_step(*args, **kwargs):
        outcome = step(*args, **kwargs)
        path = _path(outcome)
        paths[path] = paths.get(path, 0) + 1
        return outcome

    store.policy.step = recording_step
    d_model = cached.weights.w1.tensor.shape[2]
    with torch.no_grad():
        for h in _inputs(d_model, 60, seed=slots):
            want = resident(h)
            got = cached(h)
            assert torch.equal(want, got)
            _check_slot_map(store)
    if not (family == "nllb" and slots == 1):  # top-2 routing never fits one slot
        assert paths.get("hits only", 0) > 0 and paths.get("loads only", 0) > 0
    if 2 <= slots < NUM_EXPERTS:  # one slot holds hits or loads, never both
        assert paths.get("hits+loads", 0) > 0
    if slots <= 2:
        assert paths.get("chunked", 0) > 0
    assert store.stats()["steps"] == sum(paths.values())


@pytest.mark.parametrize("family,slots", [("switch", 3), ("nllb", 3), ("nllb", 1)])
def test_one_token_steps_run_the_plan_free_kernels_on_the_slots(family, slots, monkeypatch):
    """Triton backend, one token per call: the cached layer runs the resident layer's decode kernels
    over its slots (one group, hits and loads in two groups, oversubscribed chunks) and gives its output."""
    pytest.importorskip("triton")
    from hf_moe_opt.kernels import gemv, kernels_interpreted

    if DEVICE.type == "cpu" and not kernels_interpreted():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    monkeypatch.setattr(cache_store, "OVERLAP_MIN_ASSIGNMENTS", 0)  # hits and loads in two groups
    resident, cached = _first_layers(family, slots, "lru", "none", 64, backend="triton")
    calls = {"slots": 0, "mapped": 0}
    inner = gemv.gemv_moe_ffn

    def counting(x, index, gates, keep, w1, *args, **kwargs):
        calls["slots"] += w1.shape[0] == slots  # over the slot tensors, not the resident layer's experts
        calls["mapped"] += kwargs.get("slot_map") is not None  # one-group steps: the kernels look slots up
        return inner(x, index, gates, keep, w1, *args, **kwargs)

    monkeypatch.setattr(gemv, "gemv_moe_ffn", counting)
    paths: dict[str, int] = {}
    step = cached.store.policy.step

    def recording_step(*args, **kwargs):
        outcome = step(*args, **kwargs)
        paths[_path(outcome)] = paths.get(_path(outcome), 0) + 1
        return outcome

    cached.store.policy.step = recording_step
    d_model = cached.weights.w1.tensor.shape[2]
    g = torch.Generator().manual_seed(slots)
    protos = torch.randn(4, d_model, generator=g)
    with torch.no_grad():
        for i in range(16):
            h = protos[(i // 2) % 3 if i % 5 else 3] + 0.01 * torch.randn(d_model, generator=g)
            h = h.view(1, 1, d_model).to(DEVICE)
            want, got = resident(h), cached(h)
            if DEVICE.type == "cpu":
                # Top-1 and top-2 steps: every group sum is rounded as the resident combine rounds it.
                assert torch.equal(want, got)
            else:
                # Compiled, a group's kernels (with a keep mask) may fuse multiply-adds differently.
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert calls["slots"] >= 16  # every cached call ran the decode kernels
    if slots == 1:  # top-2 never fits one slot
        assert paths == {"chunked": 16}
    else:
        assert paths.get("hits only", 0) > 0 and paths.get("loads only", 0) > 0
        assert calls["mapped"] >= paths["hits only"] + paths["loads only"]
    if family == "nllb" and slots == 3:
        assert paths.get("hits+loads", 0) > 0


def test_clear_and_refresh_reset_the_slot_map():
    resident, cached = _first_layers("switch", 3, "lifo", "none", 64)
    store = cached.store
    d_model = cached.weights.w1.tensor.shape[2]
    inputs = _inputs(d_model, 10, seed=5)
    with torch.no_grad():
        for h in inputs:
            cached(h)
        assert store.policy.resident
        store.clear()
        _check_slot_map(store)
        assert not store.policy.resident
        for h in inputs:
            assert torch.equal(resident(h), cached(h))
        _check_slot_map(store)


def _random_steps(num_experts: int, steps: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    hot = rng.sample(range(num_experts), 3)
    out = []
    for _ in range(steps):
        pool = hot if rng.random() < 0.6 else range(num_experts)
        needed = rng.sample(list(pool), rng.randint(1, min(len(pool), 4)))
        out.append((needed, [rng.randint(1, 5) for _ in needed]))
    return out


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("slots,pinned", [(3, ()), (4, (1,)), (2, ()), (6, (0, 5))])
def test_all_hit_shortcut_matches_the_general_path(name, slots, pinned):
    fast = make_policy(name, slots, 8, pinned)
    general = make_policy(name, slots, 8, pinned)
    general._serve_hits = general._serve  # every step through the general path
    shortcut_steps = 0
    for needed, counts in _random_steps(8, 300, seed=slots):
        shortcut_steps += all(fast.slot_of(e) is not None for e in needed)
        assert fast.step(needed, counts) == general.step(needed, counts)
        assert {e: fast.slot_of(e) for e in range(8)} == {e: general.slot_of(e) for e in range(8)}
    assert shortcut_steps > 0
    if hasattr(fast, "score"):  # the frequency policies' rankings (lfru, adaptive) agree too
        assert all(fast.score(e) == general.score(e) for e in range(8))
