"""Expert-buffering eviction policies, Belady's MIN, the simulator and the synthetic traces."""

from __future__ import annotations

import inspect
import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_moe_opt
from hf_moe_opt.cache import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    AdaptiveLFUPolicy,
    BeladyPolicy,
    CachedExpertStore,
    ChangePointPolicy,
    EvictionPolicy,
    LFRUPolicy,
    RoutingTrace,
    as_trace,
    belady,
    hit_rate_curve,
    make_policy,
    simulate,
    synthetic_trace,
    trace_from_assignments,
    trace_from_counts,
)

# The textbook page-reference string (Silberschatz et al.): 3 frames give FIFO 15, LRU 12, OPT 9
# page faults; 4 frames give OPT 8.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
# Belady's anomaly string: FIFO has 9 faults with 3 frames and 10 with 4; OPT has 7 with 3.
ANOMALY = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


def run(policy: EvictionPolicy, trace: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Evicted experts of each step."""
    return [policy.step(step).evicted for step in trace]


# --------------------------------------------------------------------- hand-computed eviction orders
def test_lifo_evicts_last_loaded_idle_expert():
    p = make_policy("lifo", 2, 5)
    outs = [p.step(s) for s in ([0], [1], [2], [3], [0])]
    assert [o.evicted for o in outs] == [(), (), (1,), (2,), ()]
    assert outs[4].hits == (0,)
    assert p.resident == {0, 3}
    assert p.slot_of(0) == 0 and p.slot_of(3) == 1


def test_lifo_skips_expert_needed_now():
    # Step 3 needs 2 (hit) and 3 (miss); the last loaded expert is 2, so LIFO must take 1 instead.
    p = make_policy("lifo", 3, 5)
    assert run(p, [[0], [1], [2], [2, 3]]) == [(), (), (), (1,)]
    assert p.resident == {0, 2, 3}


def test_fifo_evicts_first_loaded():
    p = make_policy("fifo", 2, 5)
    assert run(p, [[0], [1], [2], [3], [0]]) == [(), (), (0,), (1,), (2,)]


def test_lru_vs_fifo_vs_lifo_after_a_reuse():
    trace = [[0], [1], [0], [2]]
    assert run(make_policy("lru", 2, 3), trace)[-1] == (1,)
    assert run(make_policy("fifo", 2, 3), trace)[-1] == (0,)
    assert run(make_policy("lifo", 2, 3), trace)[-1] == (1,)


def test_lru_orders_uses_within_a_step_by_routing_order():
    # Both used in step 0; 3 routed before 1, so 3 is the least recent.
    p = make_policy("lru", 2, 4)
    assert run(p, [[3, 1], [2]]) == [(), (3,)]
    p = make_policy("lru", 2, 4)
    assert run(p, [[1, 3], [2]]) == [(), (1,)]


def test_lfu_counts_steps_and_breaks_ties_by_recency():
    trace = [[0], [0], [1], [2]]
    assert run(make_policy("lfu", 2, 3), trace)[-1] == (1,)  # 0 used twice
    assert run(make_policy("lru", 2, 3), trace)[-1] == (0,)
    assert run(make_policy("lfu", 2, 3), [[0], [1], [2]])[-1] == (0,)  # tie: 0 is older


def test_lfu_frequency_survives_eviction():
    p = make_policy("lfu", 2, 4)
    evicted = run(p, [[0], [0], [1, 2], [0, 3], [1]])
    # step 2 evicts 0 (the only idle expert; it keeps its count of 2). Step 3 reloads 0 (count 3)
    # and 3: idle 1 and 2 both have count 1, 1 was used first -> 1, then 2. Step 4 needs 1: the idle
    # experts are 0 (count 3) and 3 (count 1) -> 3.
    assert evicted == [(), (), (0,), (1, 2), (3,)]


def test_lfru_half_life_moves_between_lru_and_lfu():
    trace = [[0], [0], [0], [1], [2]]
    # Half-life 1: 0 scores 1/16 + 1/8 + 1/4 = 0.4375 at step 4, 1 scores 1/2 -> evict 0 (like LRU).
    short = LFRUPolicy(2, 3, half_life=1.0)
    assert run(short, trace)[-1] == (0,)
    # Long half-life: 0 scores about 3, 1 about 1 -> evict 1 (like LFU).
    long = make_policy("lfru", 2, 3, half_life=1000.0)
    assert run(long, trace)[-1] == (1,)


def test_lfru_score_values():
    p = LFRUPolicy(3, 3, half_life=2.0)
    for step in ([0], [1], [], []):
        p.step(step)
    # 0 used at step 0, now step 4: 2**(-4/2); 1 used at step 1: 2**(-3/2).
    assert p.score(0) == pytest.approx(0.25)
    assert p.score(1) == pytest.approx(2**-1.5)
    assert p.score(2) == 0.0


def test_lfru_uses_token_counts():
    # Without counts 0 and 1 tie on score; 0 routed first is older -> evicted.
    plain = make_policy("lfru", 2, 3, half_life=1000.0)
    assert run(plain, [[0, 1], [2]])[-1] == (0,)
    # Counts 9:1 make 0 heavier (1 + 0.9 vs 1 + 0.1) -> 1 is evicted instead.
    weighted = make_policy("lfru", 2, 3, half_life=1000.0)
    weighted.step([0, 1], [9, 1])
    assert weighted.step([2], [4]).evicted == (1,)
    # count_weight=0 ignores the counts again.
    flat = make_policy("lfru", 2, 3, half_life=1000.0, count_weight=0.0)
    flat.step([0, 1], [9, 1])
    assert flat.step([2], [4]).evicted == (0,)


def test_adaptive_counts_a_continued_use_less_than_an_arrival():
    # 1 arrives three separate times (3 arrivals); 0 arrives once and stays 3 more steps
    # (1 + 3 * 0.5 = 2.5). When 3 needs a slot, adaptive evicts 0; LFU (4 steps against 3), LRU
    # (1 is older) and LFRU (0's uses are more recent and more) all evict 1.
    trace = [[1], [2], [1], [2], [1], [0], [0], [0], [0], [3]]
    p = make_policy("adaptive", 2, 4)
    assert run(p, trace) == [(), (), (), (), (), (2,), (), (), (), (0,)]
    assert p.score(1) == 3.0 and p.changes == ()
    for other in ("lfu", "lru", "lfru"):
        assert run(make_policy(other, 2, 4), trace)[-1] == (1,), other
    # continuation_weight=1 counts every step alike, as LFU does.
    assert run(make_policy("adaptive", 2, 4, continuation_weight=1.0), trace)[-1] == (1,)


def test_adaptive_forgets_the_popularity_before_a_detected_change():
    # 40 steps alternate 0 and 1, then 2 and 3 take over. LFU keeps the stale 0 or 1 and makes 2 and
    # 3 evict each other at every step; adaptive detects the change 4 steps in, places its start
    # at step 40 (where a candidate regime opened), and from then on keeps 2 and 3.
    trace = [[0], [1]] * 20 + [[2], [3]] * 10 + [[4]]
    p = make_policy("adaptive", 3, 6)
    evicted = run(p, trace)
    assert [(t, e) for t, e in enumerate(evicted) if e] == [(41, (2,)), (42, (3,)), (43, (2,)), (44, (0,)), (60, (1,))]
    assert p.changes == (44,) and p.regime_start == 40
    assert [p.score(e) for e in range(6)] == [0.0, 0.0, 10.0, 10.0, 1.0, 0.0]
    lfu = run(make_policy("lfu", 3, 6), trace)
    assert all(lfu[t] in ((2,), (3,)) for t in range(41, 61))  # thrashes between 2 and 3
    assert run(make_policy("lru", 3, 6), trace)[41] == (0,)  # LRU drops 0 at the first miss


def test_adaptive_recheck_overlap_rule_at_its_boundary():
    """0 and 1 alternate, then 2 and 0: a change is detected; ``recheck`` steps later the two experts
    used most since it ({0, 2}) share one of two with those ranked highest before it ({0, 1}). With
    ``recheck_overlap=0.5`` one of two is enough (1 >= 0.5 * 2): the change is undone at its recheck
    and the regime start goes back to 0; with 0.75 it is not (1 < 1.5) and the change stays."""
    trace = [[0], [1]] * 20 + [[2], [0]] * 10
    for overlap, undone in ((0.5, True), (0.75, False)):
        p = make_policy("adaptive", 2, 6, recheck=4, recheck_overlap=overlap)
        run(p, trace)
        assert len(p.changes) == 1 and p.changes[0] >= 40
        assert p.undone == ((p.changes[0] + 4,) if undone else ())
        assert (p.regime_start == 0) == undone and (undone or p.regime_start >= 40)
    # The most used since the change are 0 (every other step) and one of 2 / 3: still one of two shared.
    p = make_policy("adaptive", 2, 6, recheck=4)
    run(p, [[0], [1]] * 20 + [[2], [0], [3], [0]] * 10)
    assert len(p.changes) == 1 and p.undone == (p.changes[0] + 4,) and p.regime_start == 0


def test_adaptive_restarts_at_the_strongest_candidate():
    """Of the candidate regimes whose evidence passes the threshold, the change goes to the strongest,
    the one that opened where the popularity really changed (step 40), not an earlier one."""
    p = make_policy("adaptive", 3, 6, recheck=0, threshold=3.0)
    run(p, [[0], [1]] * 20 + [[2], [3], [2]])
    assert len(p.changes) == 1 and p.regime_start == 40
    assert [p.score(e) for e in range(4)] == [0.0, 0.0, 2.0, 1.0]  # 2 arrived twice, 3 once since step 40


def test_adaptive_detects_no_change_in_a_fixed_popularity():
    tr = synthetic_trace(64, 2, 8, 1500, zipf_s=1.0, stickiness=0.5, seed=11)
    p = make_policy("adaptive", 16, 64)
    for step, counts in zip(tr.steps, tr.counts, strict=True):
        p.step(step, counts)
    assert p.changes == () and p.regime_start == 0


def test_adaptive_pinned_experts_stay_through_changes():
    tr = synthetic_trace(16, 2, 4, 600, reshuffle_every=100, seed=4)
    p = make_policy("adaptive", 5, 16, pinned=[3, 7])
    for step in tr.steps:
        out = p.step(step)
        assert not {3, 7} & set(out.evicted)
        assert all(ld.slot >= 2 for ld in out.loads if ld.expert not in (3, 7))
    assert p.changes  # the reshuffles were detected
    assert p.slot_of(3) == 0 and p.slot_of(7) == 1


def test_adaptive_reset_forgets_everything():
    tr = synthetic_trace(16, 2, 4, 400, reshuffle_every=100, seed=5)
    used = make_policy("adaptive", 4, 16)
    for step in tr.steps:
        used.step(step)
    assert used.changes and used.resident
    used.reset()
    assert used.changes == () and used.regime_start == 0 and used.steps_seen == 0 and not used.resident
    assert all(used.score(e) == 0.0 for e in range(16))
    fresh = make_policy("adaptive", 4, 16)
    assert [used.step(s) for s in tr.steps] == [fresh.step(s) for s in tr.steps]
    assert used.changes == fresh.changes


def test_adaptive_oversubscribed_step_evicts_finished_experts_by_count():
    # 2 arrives twice, 1 once (in this step). Chunk 1 evicts the finished 1 before 2, where LRU
    # evicts 2 first (routed first).
    p = make_policy("adaptive", 2, 5)
    for step in ([2], [0], [2], [0]):
        p.step(step)
    out = p.step([2, 1, 3, 4])
    assert out.hits == (2,) and out.misses == (1, 3, 4)
    assert out.chunks == ((2, 1), (3, 4))
    assert out.evicted == (0, 1, 2)
    assert [ld.chunk for ld in out.loads] == [0, 1, 1]
    lru = make_policy("lru", 2, 5)
    for step in ([2], [0], [2], [0]):
        lru.step(step)
    assert lru.step([2, 1, 3, 4]).evicted == (0, 2, 1)


@pytest.mark.parametrize("name", ["adaptive", "changepoint"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_change_aware_policies_beat_lfu_when_popularity_shifts(name, seed):
    tr = synthetic_trace(64, 2, 8, 600, zipf_s=1.0, stickiness=0.5, reshuffle_every=150, seed=seed)
    assert simulate(tr, name, 16).hit_rate > simulate(tr, "lfu", 16).hit_rate


def test_adaptive_recheck_undoes_a_false_alarm_and_keeps_a_real_change():
    # Fixed popularity, a detector set to trip easily (threshold 1 nat): with recheck=16 every change
    # it finds in the first 1000 steps is checked 16 steps later, and a change that left the top
    # experts where they were is undone (the regime start goes back, the old counts with it).
    tr = synthetic_trace(64, 2, 8, 1000, zipf_s=1.2, stickiness=0.5, seed=3)
    plain = make_policy("adaptive", 16, 64, threshold=1.0, recheck=0)
    checked = make_policy("adaptive", 16, 64, threshold=1.0, recheck=16, recheck_overlap=0.5)
    starts = []
    for step, counts in zip(tr.steps, tr.counts, strict=True):
        plain.step(step, counts)
        before = checked.regime_start
        checked.step(step, counts)
        starts.append((before, checked.regime_start))
    assert plain.changes and checked.undone and plain.undone == ()
    for t in checked.undone:
        assert any(0 < t - c <= 16 for c in checked.changes)  # undone at its recheck, no later
        assert starts[t][1] < starts[t][0]  # the earlier regime start came back
    assert (
        simulate(tr, "adaptive", 16, threshold=1.0, recheck=16).hit_rate
        > simulate(tr, "adaptive", 16, threshold=1.0, recheck=0).hit_rate
    )
    # A real change: 0 and 1 alternate, then 2 and 3 take over; the recheck finds other top experts
    # and keeps the change (the forgetting of test_adaptive_forgets_the_popularity_before_a_detected_change).
    trace = [[0], [1]] * 20 + [[2], [3]] * 10 + [[4]]
    p = make_policy("adaptive", 3, 6, recheck=4)
    run(p, trace)
    assert p.changes == (44,) and p.undone == () and p.regime_start == 40


def test_adaptive_undoes_a_false_alarm_once_the_replaced_regime_predicts_better():
    # The same easily tripped detector with a long recheck: the later arrivals' likelihood under the
    # replaced regime undoes false alarms before their recheck is due.
    tr = synthetic_trace(64, 2, 8, 1000, zipf_s=1.2, stickiness=0.5, seed=3)
    p = make_policy("adaptive", 16, 64, threshold=1.0, recheck=200)
    for step, counts in zip(tr.steps, tr.counts, strict=True):
        p.step(step, counts)
    early = [t for t in p.undone if any(0 < t - c < 200 for c in p.changes)]
    assert early
    # A real change is kept for the whole recheck: the replaced counts predict 2 and 3 badly.
    p = make_policy("adaptive", 3, 6, recheck=30)
    run(p, [[0], [1]] * 20 + [[2], [3]] * 40)
    assert p.changes and p.undone == () and p.regime_start >= 40


def test_adaptive_breaks_ties_by_the_replaced_counts_while_a_recheck_is_due():
    # 0 used 20 times up to step 38, 5 once at step 39; then 2 and 3 take over (a change at 45).
    trace = [[0], [1]] * 19 + [[0], [5]] + [[2], [3]] * 3
    p = make_policy("adaptive", 3, 8, recheck=30)
    run(p, trace)
    assert p.changes == (45,) and p.regime_start == 40 and p._replaced is not None  # its recheck due
    # Neither has a use in the new regime: the replaced counts keep 0 (least recently used otherwise).
    assert p._choose_victim([0, 5]) == 5
    run(p, [[2], [3]] * 20)  # past the recheck: the change stands, ties go by recency again
    assert p.undone == () and p._replaced is None and p._choose_victim([0, 5]) == 0


def test_adaptive_options_pass_through_make_policy():
    p = make_policy("adaptive", 4, 8, threshold=5.0, continuation_weight=0.25, restart_every=4, horizon=64)
    assert isinstance(p, AdaptiveLFUPolicy)
    assert (p.threshold, p.continuation_weight, p.restart_every, p.horizon) == (5.0, 0.25, 4, 64)
    assert (p.recheck, p.recheck_overlap) == (32, 0.5)  # the recheck is on by default
    assert "horizon=64" in repr(p)
    p = make_policy("adaptive", 4, 8, recheck=0, recheck_overlap=0.75)
    assert (p.recheck, p.recheck_overlap) == (0, 0.75) and "recheck=0" in repr(p)


def _reference_changepoint(trace, num_experts, hazard, prior, continuation_weight, max_runs, evidence, open_every):
    """Each step's mixture probabilities of a plain Bayesian online change-point model, written out
    from ChangePointPolicy's description: runs are dicts, sums are Python loops."""
    runs = [{"start": 0, "uses": [0.0] * num_experts, "total": 0.0, "logw": 0.0}]
    prev: list[int] = []
    out = []
    for t, step in enumerate(trace):
        order = list(dict.fromkeys(step))
        fresh = [e for e in order if e not in prev]
        idle = num_experts - len(prev)
        top = max(r["logw"] for r in runs)
        log_total = top + math.log(sum(math.exp(r["logw"] - top) for r in runs))
        for r in runs:
            ll = 0.0
            if fresh:
                mass = r["total"] + prior * idle - sum(r["uses"][e] for e in prev)
                ll = sum(math.log(r["uses"][e] + prior) for e in fresh) - len(fresh) * math.log(mass)
            r["logw"] += evidence * ll
        opening = t % open_every == 0
        # A change at any of the open_every steps since the last opening, against none.
        stay = (1.0 - hazard) ** open_every
        new_w = log_total + math.log(1.0 - stay) - math.log(stay)
        new_w -= evidence * len(fresh) * math.log(idle) if fresh else 0.0
        top = max(max(r["logw"] for r in runs), new_w if opening else -math.inf)
        runs = [r for r in runs if r["logw"] > top + math.log(1e-8)]
        if opening:
            heaviest = sorted(range(len(runs)), key=lambda i: -runs[i]["logw"])[: max_runs - 1]
            runs = [runs[i] for i in sorted(heaviest)]
            runs.append({"start": t, "uses": [0.0] * num_experts, "total": 0.0, "logw": new_w})
        for e in order:
            w = continuation_weight if e in prev else 1.0
            for r in runs:
                r["uses"][e] += w
                r["total"] += w
        prev = order
        top = max(r["logw"] for r in runs)
        z = sum(math.exp(r["logw"] - top) for r in runs)
        p = [0.0] * num_experts
        for r in runs:
            w = math.exp(r["logw"] - top) / z
            for e in range(num_experts):
                p[e] += w * (r["uses"][e] + prior) / (r["total"] + prior * num_experts)
        out.append((p, sorted(r["start"] for r in runs)))
    return out


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"hazard": 0.05, "prior": 0.5, "continuation_weight": 1.0, "max_runs": 3, "evidence": 1.0, "open_every": 1},
        {"hazard": 0.001, "max_runs": 64, "evidence": 0.3, "open_every": 3},
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_changepoint_matches_a_plain_reference(options, seed):
    tr = synthetic_trace(16, 2, 4, 250, zipf_s=1.0, stickiness=0.5, reshuffle_every=60, seed=seed)
    p = make_policy("changepoint", 5, 16, **options)
    full = {"hazard": 0.005, "prior": 1.5, "continuation_weight": 0.3, "max_runs": 4, "evidence": 0.7, "open_every": 8}
    full |= options
    ref = _reference_changepoint(tr.steps, 16, **full)
    pruned = False
    for step, (ref_p, ref_starts) in zip(tr.steps, ref, strict=True):
        out = p.step(step)
        np.testing.assert_allclose([p.probability(e) for e in range(16)], ref_p, rtol=1e-9, atol=0)
        assert sorted(p.run_starts) == ref_starts
        pruned |= len(ref_starts) < p.steps_seen
        # Every victim is at most as likely as each idle expert that stays.
        staying = [e for e in p.resident if e not in step]
        if out.evicted and staying:
            assert max(ref_p[e] for e in out.evicted) <= min(ref_p[e] for e in staying) + 1e-12
    assert pruned


@pytest.mark.parametrize("num_experts", [128, 256])
def test_changepoint_with_many_experts_and_prefills(num_experts):
    """A prefill newly needs hundreds of experts among hundreds of idle ones: the runs' likelihoods
    (products of that many probabilities) and the new run's uniform one leave the float range unless
    taken in logarithms. The mixture still matches the plain reference at every step."""
    g = np.random.default_rng(num_experts)
    trace = [
        list(range(num_experts)) if t % 5 == 0 else g.choice(num_experts, 3, replace=False).tolist() for t in range(40)
    ]
    p = make_policy("changepoint", num_experts // 2, num_experts)
    full = {"hazard": 0.005, "prior": 1.5, "continuation_weight": 0.3, "max_runs": 4, "evidence": 0.7, "open_every": 8}
    ref = _reference_changepoint(trace, num_experts, **full)
    for step, (ref_p, ref_starts) in zip(trace, ref, strict=True):
        p.step(step)
        np.testing.assert_allclose([p.probability(e) for e in range(num_experts)], ref_p, rtol=1e-9, atol=0)
        assert sorted(p.run_starts) == ref_starts


def test_changepoint_counts_a_continued_use_less_than_an_arrival():
    # As for adaptive: 1 arrives three times, 0 arrives once and stays three more steps (1 + 3 * 0.3).
    trace = [[1], [2], [1], [2], [1], [0], [0], [0], [0], [3]]
    assert run(make_policy("changepoint", 2, 4), trace)[-1] == (0,)
    assert run(make_policy("changepoint", 2, 4, continuation_weight=1.0), trace)[-1] == (1,)


def test_changepoint_follows_a_change_that_lfu_thrashes_on():
    # 44 steps alternate 0 and 1, then 2 and 3 take over. LFU makes 2 and 3 evict each other for
    # good; changepoint keeps them once the run opened after the change (step 48) carries the
    # weight, and with a run opened every step sooner.
    trace = [[0], [1]] * 22 + [[2], [3]] * 10 + [[4]]
    p = make_policy("changepoint", 3, 6)
    evicted = [(t, e) for t, e in enumerate(run(p, trace)) if e]
    assert evicted == [(t, (2,) if t % 2 else (3,)) for t in range(45, 51)] + [(51, (0,)), (64, (1,))]
    assert p.run_starts[0] == 48
    prob = [p.probability(e) for e in range(6)]
    assert prob[2] > 0.3 and prob[3] > 0.3 and max(prob[0], prob[1], prob[5]) < 0.1
    assert abs(sum(prob) - 1.0) < 1e-12
    every_step = run(make_policy("changepoint", 3, 6, open_every=1), trace)
    expected = [(45, (2,)), (46, (3,)), (47, (2,)), (48, (0,)), (64, (1,))]
    assert [(t, e) for t, e in enumerate(every_step) if e] == expected
    lfu = run(make_policy("lfu", 3, 6), trace)
    assert all(lfu[t] in ((2,), (3,)) for t in range(45, 65))


def test_changepoint_keeps_the_oldest_run_on_a_fixed_popularity():
    tr = synthetic_trace(64, 2, 8, 1500, zipf_s=1.0, stickiness=0.5, seed=11)
    p = make_policy("changepoint", 16, 64)
    for step, counts in zip(tr.steps, tr.counts, strict=True):
        p.step(step, counts)
    assert p.run_starts[0] == 0


def test_changepoint_pinned_and_reset():
    tr = synthetic_trace(16, 2, 4, 400, reshuffle_every=100, seed=5)
    used = make_policy("changepoint", 5, 16, pinned=[3, 7])
    for step in tr.steps:
        out = used.step(step)
        assert not {3, 7} & set(out.evicted)
    assert used.slot_of(3) == 0 and used.slot_of(7) == 1
    used.reset()
    assert used.run_starts == (0,) and used.steps_seen == 0 and not used.resident
    fresh = make_policy("changepoint", 5, 16, pinned=[3, 7])
    assert [used.step(s) for s in tr.steps] == [fresh.step(s) for s in tr.steps]


def test_changepoint_options_and_the_defaults():
    p = make_policy("changepoint", 4, 8, hazard=0.01, prior=2.0, continuation_weight=0.5, max_runs=8, evidence=0.9)
    assert isinstance(p, ChangePointPolicy)
    assert (p.hazard, p.prior, p.continuation_weight, p.max_runs, p.evidence) == (0.01, 2.0, 0.5, 8, 0.9)
    assert "max_runs=8" in repr(p)
    # optimize() and the cache build the default policy when none is named.
    assert DEFAULT_POLICY == "changepoint"
    assert inspect.signature(hf_moe_opt.optimize).parameters["cache_policy"].default == DEFAULT_POLICY
    assert inspect.signature(CachedExpertStore).parameters["policy"].default == DEFAULT_POLICY
    rng = random.Random(3)
    for _ in range(200):  # max_runs bounds the hypotheses
        p.step(rng.sample(range(8), rng.randint(1, 3)))
        assert 1 <= len(p.run_starts) <= 8


@pytest.mark.parametrize(
    ("policy", "option"),
    [("adaptive", "restart_every"), ("adaptive", "horizon"), ("adaptive", "recheck"), ("changepoint", "max_runs")]
    + [("changepoint", "open_every")],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5, "8"])
def test_integer_options_refuse_non_integers_by_name(policy, option, value):
    with pytest.raises(ValueError, match=option):
        make_policy(policy, 4, 8, **{option: value})


def test_repeated_ids_in_a_step_count_once_and_merge_counts():
    p = make_policy("lfru", 2, 3, half_life=1000.0)
    out = p.step([1, 0, 1], [1, 1, 8])  # expert 1: 9 tokens, expert 0: 1 token
    assert out.misses == (1, 0) and out.hits == ()
    assert p.step([2], [1]).evicted == (0,)


# ----------------------------------------------------------------------------- oversubscribed steps
def test_oversubscribed_step_runs_in_chunks():
    p = make_policy("lru", 2, 5)
    p.step([0])
    out = p.step([1, 2, 3, 4])
    assert out.chunks == ((1, 2), (3, 4))
    assert out.misses == (1, 2, 3, 4) and out.hits == ()
    # 0 is idle and goes first; then chunk 1 evicts the finished experts, least recent first.
    assert out.evicted == (0, 1, 2)
    assert [ld.chunk for ld in out.loads] == [0, 0, 1, 1]
    assert p.resident == {3, 4}


def test_oversubscribed_step_keeps_hits_in_first_chunk():
    p = make_policy("lru", 2, 5)
    p.step([0])
    out = p.step([3, 0, 1, 2])
    assert out.hits == (0,) and out.misses == (3, 1, 2)
    assert out.chunks == ((3, 0), (1, 2))
    assert out.evicted == (3, 0)  # 3 used before 0 within chunk 0


# -------------------------------------------------------------------------------------- pinned
def test_pinned_expert_owns_slot_and_is_never_evicted():
    p = make_policy("lifo", 3, 6, pinned=[4])
    outs = [p.step(s) for s in ([4], [0], [1], [2], [3], [4])]
    assert outs[0].misses == (4,) and outs[0].loads[0].slot == 0
    assert [o.evicted for o in outs] == [(), (), (), (1,), (2,), ()]
    assert outs[5].hits == (4,)
    assert p.slot_of(4) == 0 and p.is_pinned(4) and not p.is_pinned(0)


def test_pinned_slot_is_reserved_before_first_use():
    # One unpinned slot: 0 and 1 must share it even though 5 has not been loaded yet.
    p = make_policy("lru", 2, 6, pinned=[5])
    assert run(p, [[0], [1], [0]]) == [(), (0,), (1,)]
    assert p.resident == {0}


# ------------------------------------------------------------------------ invariants (hypothesis)
@st.composite
def cache_cases(draw, fit: bool):
    num_experts = draw(st.integers(1, 7))
    num_slots = draw(st.integers(1, num_experts + 1))
    max_pinned = min(num_slots - 1 if num_experts > num_slots else num_slots, num_experts)
    pinned = draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=max(max_pinned, 0)))
    capacity = num_slots - len(pinned)
    steps = []
    for _ in range(draw(st.integers(0, 14))):
        step = draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_experts))
        if fit:
            unpinned = [e for e in step if e not in pinned][:capacity]
            step = [e for e in step if e in pinned or e in unpinned]
        steps.append(step)
    return num_experts, num_slots, pinned, steps


def check_invariants(policy: EvictionPolicy, steps: list[list[int]]) -> None:
    slot_map: dict[int, int] = {}  # slot -> expert, replayed from the outcomes
    for step in steps:
        before = policy.resident
        out = policy.step(step)
        assert set(out.hits) == set(step) & before
        assert set(out.misses) == set(step) - before
        assert sorted(itertools.chain(*out.chunks)) == sorted(set(step))
        oversubscribed = len(out.chunks) > 1
        finished: set[int] = set()
        for c, chunk in enumerate(out.chunks):
            for ld in (ld for ld in out.loads if ld.chunk == c):
                assert ld.evicted not in policy.pinned
                if ld.evicted is not None:
                    assert slot_map[ld.slot] == ld.evicted
                    # Needed-now experts go only once the step has finished with them.
                    if ld.evicted in step:
                        assert oversubscribed and ld.evicted in finished
                else:
                    assert ld.slot not in slot_map
                slot_map[ld.slot] = ld.expert
            assert set(chunk) <= set(slot_map.values())  # a chunk is resident together
            finished |= set(chunk)
        assert {e: s for s, e in slot_map.items()} == {e: policy.slot_of(e) for e in policy.resident}
        assert len(policy.resident) <= policy.num_slots
        for i, e in enumerate(policy.pinned):
            assert policy.slot_of(e) in (None, i)
        assert set(policy.pinned) & policy.resident >= set(policy.pinned) & before


@settings(max_examples=60, deadline=None)
@given(cache_cases(fit=False), st.sampled_from(POLICY_NAMES))
def test_invariants_hold_for_every_policy(case, name):
    num_experts, num_slots, pinned, steps = case
    check_invariants(make_policy(name, num_slots, num_experts, pinned), steps)


@settings(max_examples=40, deadline=None)
@given(cache_cases(fit=False))
def test_invariants_hold_for_belady(case):
    num_experts, num_slots, pinned, steps = case
    check_invariants(BeladyPolicy(steps, num_slots, num_experts, pinned), steps)


# --------------------------------------------------------------------------------------- Belady
def test_belady_textbook_reference_string():
    trace = [[x] for x in TEXTBOOK]
    assert belady(trace, 3).misses == 9
    assert belady(trace, 4).misses == 8
    assert simulate(trace, "fifo", 3).misses == 15
    assert simulate(trace, "lru", 3).misses == 12
    assert belady(trace, 3).hits == len(TEXTBOOK) - 9


def test_belady_anomaly_string():
    trace = [[x] for x in ANOMALY]
    assert simulate(trace, "fifo", 3).misses == 9
    assert simulate(trace, "fifo", 4).misses == 10
    assert belady(trace, 3).misses == 7


def test_belady_policy_rejects_a_different_trace():
    p = BeladyPolicy([[0], [1]], 1, 2)
    p.step([0])
    with pytest.raises(ValueError, match="trace says"):
        p.step([0])
    p = BeladyPolicy([[0]], 1, 2)
    p.step([0])
    with pytest.raises(ValueError, match="past the end"):
        p.step([1])


def exhaustive_optimum(steps: list[list[int]], num_slots: int) -> int:
    """Fewest misses over every legal cache schedule (no pinned experts, no oversubscribed step)."""
    states: dict[frozenset[int], int] = {frozenset(): 0}
    for step in steps:
        need = frozenset(step)
        nxt: dict[frozenset[int], int] = {}
        for resident, cost in states.items():
            c = cost + len(need - resident)
            keep_from = sorted(resident - need)
            room = num_slots - len(need)
            for r in range(min(room, len(keep_from)) + 1):
                for kept in itertools.combinations(keep_from, r):
                    s = need | frozenset(kept)
                    if c < nxt.get(s, 1 << 30):
                        nxt[s] = c
        states = nxt
    return min(states.values())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_belady_matches_exhaustive_optimum(num_experts, num_slots, data):
    num_slots = min(num_slots, num_experts)
    steps = data.draw(st.lists(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=num_slots), max_size=9))
    assert belady(steps, num_slots, num_experts=num_experts).misses == exhaustive_optimum(steps, num_slots)


@settings(max_examples=80, deadline=None)
@given(cache_cases(fit=True))
def test_belady_beats_every_online_policy(case):
    num_experts, num_slots, pinned, steps = case
    best = belady(steps, num_slots, num_experts=num_experts, pinned=pinned)
    for name in POLICY_NAMES:
        res = simulate(steps, name, num_slots, num_experts=num_experts, pinned=pinned)
        assert res.accesses == best.accesses
        assert best.hits >= res.hits, name


def test_belady_on_oversubscribed_steps_is_greedy():
    # The documented case where the chunk rules let LIFO beat the greedy MIN.
    trace = [[1, 0], [0, 1], [1]]
    assert simulate(trace, "lifo", 1).hits == 2
    assert belady(trace, 1).hits == 1


def test_belady_oversubscribed_step_ends_holding_the_soonest_needed():
    """An oversubscribed step loads its misses farthest-needed first, so it ends holding the experts
    needed soonest (worked by hand: each next step then hits what it needs first)."""
    cases = [
        # 1 slot: 0 is next needed at step 2, 1 at step 1 -> end holding 1, hit it, then miss 0.
        ([[0, 1], [1], [0]], 1, 1, (2, 0, 1)),
        # 2 slots: next uses 2 -> 1, 1 -> 2, 0 -> 3: end holding {2, 1}.
        ([[0, 1, 2], [2], [1], [0]], 2, 2, (3, 0, 0, 1)),
        # 2 slots, 4 misses: 1 and 2 are needed next step, 0 after, 3 never: end holding {1, 2}.
        ([[3, 0, 1, 2], [1, 2], [0]], 2, 2, (4, 0, 1)),
    ]
    for trace, slots, hits, per_step in cases:
        result = belady(trace, slots)
        assert (result.hits, result.per_step_misses) == (hits, per_step), trace


# ------------------------------------------------------------------------------------ simulator
def test_simulate_counts_each_needed_expert_once_per_step():
    trace = [[0, 1], [1, 1, 2], [2]]
    res = simulate(trace, "lru", 3)
    assert (res.hits, res.misses, res.per_step_misses) == (2, 3, (2, 1, 0))
    assert res.hit_rate == pytest.approx(2 / 5)
    assert res.num_steps == 3 and res.policy == "lru" and res.num_slots == 3


def test_simulate_cold_start_with_every_expert_resident():
    tr = synthetic_trace(8, 2, 4, 30, seed=3)
    cold = len({e for step in tr for e in step})
    for name in (*POLICY_NAMES, "belady"):
        res = simulate(tr, name, 8)
        assert res.misses == cold, name
        assert res.per_step_misses[0] == len(tr[0])


def test_simulate_pinned_reduces_capacity_for_the_rest():
    trace = [[0], [1], [0], [1]]
    assert simulate(trace, "lru", 2).misses == 2
    assert simulate(trace, "lru", 2, num_experts=3, pinned=[2]).misses == 4
    assert belady(trace, 2, num_experts=3, pinned=[2]).misses == 4


def test_hit_rate_curve_shape_and_values():
    tr = synthetic_trace(16, 2, 2, 200, zipf_s=1.2, stickiness=0.6, seed=1)
    slots = [4, 8, 16]
    curve = hit_rate_curve(tr, ["lru", "lifo"], slots)
    assert list(curve) == ["lru", "lifo", "belady"]
    assert all(len(v) == len(slots) for v in curve.values())
    for s_i, s in enumerate(slots):
        assert curve["lru"][s_i] == pytest.approx(simulate(tr, "lru", s).hit_rate)
        assert curve["belady"][s_i] >= max(curve["lru"][s_i], curve["lifo"][s_i])
    assert curve["belady"] == sorted(curve["belady"])
    assert curve["belady"][0] < curve["belady"][-1]
    assert list(hit_rate_curve(tr, ["lfu"], [4], include_belady=False)) == ["lfu"]
    assert len(hit_rate_curve([[0], [1]], ["lru"])["lru"]) == 2  # default: 1 .. num_experts


def test_skewed_trace_policies_beat_nothing_and_trail_belady():
    tr = synthetic_trace(32, 2, 4, 300, zipf_s=1.2, stickiness=0.5, seed=7)
    b = simulate(tr, "belady", 8).hit_rate
    for name in POLICY_NAMES:
        r = simulate(tr, name, 8).hit_rate
        assert 0.2 < r <= b, name


# ------------------------------------------------------------------------------------ traces
def test_synthetic_trace_shape_and_seed():
    a = synthetic_trace(64, 2, 64, 50, seed=5)
    assert a == synthetic_trace(64, 2, 64, 50, seed=5)
    assert a != synthetic_trace(64, 2, 64, 50, seed=6)
    assert len(a) == 50 and a.num_experts == 64
    m = a.count_matrix()
    assert m.shape == (50, 64) and (m.sum(axis=1) == 128).all()
    for step, counts in zip(a.steps, a.counts, strict=True):
        assert len(set(step)) == len(step) and min(counts) >= 1


def test_synthetic_trace_is_skewed_and_sticky():
    skew = synthetic_trace(64, 2, 16, 400, zipf_s=1.2, stickiness=0.0, seed=0).count_matrix().sum(0)
    flat = synthetic_trace(64, 2, 16, 400, zipf_s=0.0, stickiness=0.0, seed=0).count_matrix().sum(0)
    top8 = lambda c: np.sort(c)[-8:].sum() / c.sum()  # noqa: E731
    assert top8(skew) > 0.5 > 0.25 > top8(flat)

    def overlap(tr: RoutingTrace) -> float:
        return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(tr.steps, tr.steps[1:], strict=False)]))

    loose = synthetic_trace(64, 1, 4, 400, zipf_s=0.5, stickiness=0.0, seed=2)
    sticky = synthetic_trace(64, 1, 4, 400, zipf_s=0.5, stickiness=0.9, seed=2)
    assert overlap(sticky) > overlap(loose) + 0.3


def test_top_k_choices_are_distinct_per_token():
    tr = synthetic_trace(4, 4, 3, 10, seed=0)  # every token must use all 4 experts
    assert all(sorted(s) == [0, 1, 2, 3] and c == (3, 3, 3, 3) for s, c in zip(tr.steps, tr.counts, strict=True))


def test_trace_from_counts_round_trip():
    m = np.array([[0, 3, 0, 1], [0, 0, 0, 0], [2, 0, 5, 0]])
    tr = trace_from_counts(m)
    assert tr.steps == ((1, 3), (), (0, 2))
    assert tr.counts == ((3, 1), (), (2, 5))
    np.testing.assert_array_equal(tr.count_matrix(), m)


def test_trace_from_assignments_keeps_first_appearance_order():
    idx = np.array([[[3, 1], [1, 0], [-1, 3]]])
    tr = trace_from_assignments(idx, 4)
    assert tr.steps == ((3, 1, 0),) and tr.counts == ((2, 2, 1),)


def test_as_trace_merges_repeats_and_infers_experts():
    tr = as_trace([[2, 0, 2], [5]], counts=[[1, 1, 3], [2]])
    assert tr.num_experts == 6 and tr.steps == ((2, 0), (5,)) and tr.counts == ((4, 1), (2,))


def test_arrays_and_profile_traces_are_refused_not_misread():
    """A [steps, experts] count matrix passed as a trace used to be read as expert ids: wrong hit rates."""
    counts = np.random.default_rng(0).integers(0, 5, size=(30, 8))
    for arr in (counts, torch.from_numpy(counts), counts[:, 0]):
        with pytest.raises(TypeError, match="trace_from_counts"):
            simulate(arr, "lru", 4)
    with pytest.raises(TypeError, match="trace_from_counts"):
        hit_rate_curve(counts, ["lru"], [4])
    profiled = hf_moe_opt.RoutingTrace(num_experts=8, top_k=1)
    profiled.add_batch("layer", counts[0])
    with pytest.raises(TypeError, match=r"trace.counts\(layer\)"):
        simulate(profiled, "lru", 4)
    # the way the errors point to gives the counts' own hit rate
    result = simulate(trace_from_counts(counts), "lru", 4)
    assert result.hits + result.misses == int((counts > 0).sum())
    # a list of 1-D arrays (one per step) stays a plain trace
    assert simulate([np.array([0, 1]), np.array([1])], "lru", 2).hits == 1


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="mru", num_slots=2, num_experts=4), "unknown eviction policy"),
        (dict(name="lru", num_slots=0, num_experts=4), "num_slots"),
        (dict(name="lru", num_slots=2, num_experts=0), "num_experts"),
        (dict(name="lru", num_slots=2, num_experts=4, pinned=[0, 1, 2]), "do not fit"),
        (dict(name="lru", num_slots=2, num_experts=4, pinned=[0, 1]), "could never be loaded"),
        (dict(name="lru", num_slots=2, num_experts=4, pinned=[4]), "out of range"),
        (dict(name="lru", num_slots=3, num_experts=4, pinned=[1, 1]), "repeat"),
        (dict(name="lru", num_slots=2, num_experts=4, half_life=3.0), "takes no options"),
        (dict(name="lfru", num_slots=2, num_experts=4, decay=3.0), "does not take"),
        (dict(name="lfru", num_slots=2, num_experts=4, half_life=0.0), "half_life"),
        (dict(name="adaptive", num_slots=2, num_experts=4, half_life=3.0), "does not take"),
        (dict(name="adaptive", num_slots=2, num_experts=4, threshold=0.0), "threshold"),
        (dict(name="adaptive", num_slots=2, num_experts=4, continuation_weight=1.5), "continuation_weight"),
        (dict(name="adaptive", num_slots=2, num_experts=4, restart_every=0), "restart_every"),
        (dict(name="adaptive", num_slots=2, num_experts=4, restart_every=2.5), "restart_every"),
        (dict(name="adaptive", num_slots=2, num_experts=4, horizon=15), "horizon"),
        (dict(name="adaptive", num_slots=2, num_experts=4, recheck=-1), "recheck"),
        (dict(name="adaptive", num_slots=2, num_experts=4, recheck=2.5), "recheck"),
        (dict(name="adaptive", num_slots=2, num_experts=4, recheck_overlap=0.0), "recheck_overlap"),
        (dict(name="adaptive", num_slots=2, num_experts=4, recheck_overlap=1.5), "recheck_overlap"),
        (dict(name="lfru", num_slots=2, num_experts=4, count_weight=float("inf")), "count_weight"),
        (dict(name="adaptive", num_slots=2, num_experts=4, threshold=True), "must be a number"),
        (dict(name="changepoint", num_slots=2, num_experts=4, hazard=0.0), "hazard"),
        (dict(name="changepoint", num_slots=2, num_experts=4, hazard=1.0), "hazard"),
        (dict(name="changepoint", num_slots=2, num_experts=4, prior=0.0), "prior"),
        (dict(name="changepoint", num_slots=2, num_experts=4, prior=float("inf")), "prior"),
        (dict(name="changepoint", num_slots=2, num_experts=4, continuation_weight=-0.1), "continuation_weight"),
        (dict(name="changepoint", num_slots=2, num_experts=4, max_runs=1), "max_runs"),
        (dict(name="changepoint", num_slots=2, num_experts=4, max_runs=2.5), "max_runs"),
        (dict(name="changepoint", num_slots=2, num_experts=4, evidence=0.0), "evidence"),
        (dict(name="changepoint", num_slots=2, num_experts=4, evidence=1.5), "evidence"),
        (dict(name="changepoint", num_slots=2, num_experts=4, open_every=0), "open_every"),
        (dict(name="changepoint", num_slots=2, num_experts=4, open_every=1.5), "open_every"),
        (dict(name="changepoint", num_slots=2, num_experts=4, threshold=5.0), "does not take"),
        (dict(name="lfru", num_slots=2, num_experts=4, half_life="8"), "must be a number"),
    ],
)
def test_make_policy_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_policy(**kwargs)


def test_make_policy_accepts_every_name_and_full_pinning():
    for name in POLICY_NAMES:
        assert make_policy(name.upper(), 3, 8).name == name
    assert make_policy("lru", 2, 2, pinned=[0, 1]).capacity == 0  # all experts pinned: fine


def test_step_errors():
    p = make_policy("lru", 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        p.step([4])
    with pytest.raises(ValueError, match="counts has"):
        p.step([0, 1], [3])
    with pytest.raises(ValueError, match="negative"):
        p.step([0], [-1])


def test_trace_and_simulate_errors():
    with pytest.raises(ValueError, match="top_k"):
        synthetic_trace(4, 5, 1, 1)
    with pytest.raises(ValueError, match="stickiness"):
        synthetic_trace(4, 1, 1, 1, stickiness=1.5)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        simulate([[0]], "random", 1)
    with pytest.raises(ValueError, match="takes no options"):
        simulate([[0]], "belady", 1, half_life=2.0)
    with pytest.raises(ValueError, match="out of range"):
        simulate([[0, 5]], "lru", 2, num_experts=4)
    with pytest.raises(ValueError, match="repeats"):
        RoutingTrace(((0, 0),), None, 2)
    with pytest.raises(ValueError, match="2-D|matrix"):
        trace_from_counts(np.zeros(3))


# --------------------------------------------------------------------------- look-ahead (prefetch)
def test_prefetch_fills_free_slots_then_evicts_by_the_policy():
    p = make_policy("lru", 3, 8)
    assert [(ld.expert, ld.slot, ld.evicted) for ld in p.prefetch([5, 6])] == [(5, 0, None), (6, 1, None)]
    assert p.steps_seen == 0 and p.resident == {5, 6}
    for step in ([5], [6], [7]):
        p.step(step)
    # LRU: 5 was used longest ago among the residents outside the prefetch set.
    assert [(ld.expert, ld.evicted) for ld in p.prefetch([2])] == [(2, 5)]
    out = p.step([2])
    assert out.hits == (2,) and out.loads == ()
    # A prefetched expert that no step has used yet ranks as never used: the first to go.
    p = make_policy("lru", 2, 8)
    p.step([0])
    p.step([1])
    assert [(ld.expert, ld.evicted) for ld in p.prefetch([5])] == [(5, 0)]
    assert p.step([3]).loads[0].evicted == 5


def test_prefetch_never_evicts_an_expert_it_prefetches_or_a_pinned_one():
    p = make_policy("lifo", 3, 8, pinned=[4])
    assert [(ld.expert, ld.slot, ld.evicted) for ld in p.prefetch([4])] == [(4, 0, None)]
    p.step([0])
    p.step([1])
    # Wanted 1 (resident), 2 and 3: 2 takes LIFO's victim among {0} (1 is wanted, 4 pinned); then no
    # candidate is left for 3, so it is skipped.
    loads = p.prefetch([1, 2, 3])
    assert [(ld.expert, ld.evicted) for ld in loads] == [(2, 0)]
    assert p.resident == {4, 1, 2}
    assert p.prefetch([1, 2]) == ()
    with pytest.raises(ValueError, match="out of range"):
        p.prefetch([8])
    # No victim for 2 (0 and 1 are wanted), but the pinned 3 after it needs none: its reserved slot.
    p = make_policy("lru", 3, 4, pinned=[3])
    p.step([0, 1])
    assert [(ld.expert, ld.evicted) for ld in p.prefetch([0, 1, 2, 3])] == [(3, None)]
    assert p.resident == {0, 1, 3}


def test_prefetch_is_no_use_for_frequency_policies():
    # LFU: a prefetched expert that the next steps do not need keeps frequency 0 and goes first.
    p = make_policy("lfu", 2, 6)
    for step in ([0], [0], [1]):
        p.step(step)
    assert [(ld.expert, ld.evicted) for ld in p.prefetch([2])] == [(2, 1)]
    p.step([0])
    assert p.step([3]).evicted == (2,)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_prefetch_interleaved_with_steps_keeps_the_slot_map_consistent(name):
    rng = np.random.default_rng(7)
    p = make_policy(name, 4, 12, pinned=[11])
    for _ in range(300):
        guess = [int(e) for e in rng.choice(12, size=rng.integers(1, 4), replace=False)]
        before = p.resident
        loads = p.prefetch(guess)
        assert {ld.evicted for ld in loads if ld.evicted is not None}.isdisjoint(set(guess) | {11})
        assert all(ld.expert in p.resident for ld in loads) and before - p.resident <= before - set(guess)
        assert p.resident - before == {ld.expert for ld in loads if ld.expert not in before}
        step = [int(e) for e in rng.choice(12, size=rng.integers(1, 3), replace=False)]
        resident = p.resident
        out = p.step(step)
        assert set(out.hits) == {e for e in step if e in resident}
        slots = [p.slot_of(e) for e in p.resident]
        assert len(set(slots)) == len(slots) and all(0 <= s < 4 for s in slots)
        if 11 in p.resident:
            assert p.slot_of(11) == 0
