"""Benchmark scripts that have a smoke mode (tiny shapes, CPU or GPU) run end to end and report consistent numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_offloaded_tiny(tmp_path) -> None:
    out = tmp_path / "offload.json"
    argv = ["--tiny", "--fraction", "0.25", "0.5", "--modes", "copy", "read", "--new-tokens", "4"]
    argv += ["--policy", "lfu", "changepoint"]
    assert _load("serve_offloaded").main([*argv, "--resident-baseline", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    expected = [(f, m, p) for f in (0.25, 0.5) for m in ("copy", "read") for p in ("lfu", "changepoint")]
    assert [(r["fraction_resident"], r["mode"], r["policy"]) for r in runs] == expected
    assert set(result["resident_ms_per_new_token"]) == {"eager"}  # no graphed mode asked for
    for run in runs:
        assert run["cached_layers"] == 4  # 2 encoder + 2 decoder sparse layers
        # 8 experts per layer: 2 or 4 slots of 8.
        assert abs(run["resident_expert_gib"] / run["expert_gib"] - run["fraction_resident"]) < 1e-9
        assert 0.0 <= run["hit_rate"] < 1.0 and run["bytes_copied"] > 0
        assert not run["ms_per_new_token"] <= 0  # a time, or NaN where CPU jitter hid it (never negative)
        assert run["x_resident"] is not None and not run["x_resident"] <= 0
        assert run["link_bytes"] >= run["bytes_copied"] and run["timed_steps"] == 3 * (1 + 4)
        if torch.cuda.is_available():
            assert run["link_floor_ms_per_step"] > 0  # the bytes over the pinned rate measured in the run
        else:
            assert run["link_floor_ms_per_step"] is None  # no pinned rate without CUDA
    # On a CPU there is no pinned host memory to read from, so "read" copies like "copy"; on a GPU
    # "read" serves misses by reading host memory where its policy chooses to.
    assert all(r["host_reads"] == 0 for r in runs if r["mode"] == "copy" or not torch.cuda.is_available())
    assert any(r["host_reads"] > 0 for r in runs if r["mode"] == "read") == torch.cuda.is_available()


def test_bench_model_cpu_smoke(tmp_path) -> None:
    """Every row carries its floor and measured / floor ratios; step graphs give optimize()'s tokens."""
    out = tmp_path / "model.json"
    assert _load("bench_model").main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    c = result["ceilings"]
    assert c["copy_bytes_per_s"] > 0 and c["read_bytes_per_s"] > 0 and c["bf16_flops_per_s"] > 0
    # Floors divide by the fastest stream: a read-only kernel may beat a copy's rate.
    assert c["memory_bytes_per_s"] == max(c["copy_bytes_per_s"], c["read_bytes_per_s"])
    assert [m["model"] for m in result["models"]] == ["switch-tiny", "nllb-tiny"]
    import transformers
    from packaging.version import Version

    from hf_moe_opt.step_graphs import NLLB_MIN_TRANSFORMERS

    old_nllb = Version(transformers.__version__) < Version(NLLB_MIN_TRANSFORMERS)
    for rec in result["models"]:
        graphs = not (old_nllb and rec["model"] == "nllb-tiny")  # NLLB-MoE steps need transformers >= 5.24
        if graphs:
            assert rec["step_graphs_unsupported"] is None and rec["step_graphs_capture"] == "eager_stand_in"
            assert rec["step_graph_counts"]["replays"] > 0 and rec["step_graph_counts"]["fallbacks"] == 0
        else:
            assert "NLLB-MoE decode steps cannot be captured whole" in rec["step_graphs_unsupported"]
        for row in rec["encoder"]:
            assert {"batch", "hf_tokens_per_s", "opt_tokens_per_s", "speedup"} <= row.keys()  # the earlier schema
            assert row["floor_ms"] > 0 and row["floor_bound"] in ("bandwidth", "matmul")
            assert row["read_gib"] > row["expert_read_gib"] > 0 and row["tflop"] > 0
            assert 1 <= row["experts_per_moe_layer"] <= 8
            for variant in ("hf", "opt"):
                assert row[f"{variant}_x_floor"] == pytest.approx(row[f"{variant}_ms"] / row["floor_ms"])
        for row in rec["decode"]:
            assert {"batch", "hf_ms_per_token", "opt_ms_per_token", "opt_graphs_ms_per_token", "speedup",
                    "speedup_graphs"} <= row.keys()  # fmt: skip
            assert row["floor_ms"] > 0 and row["kv_read_gib"] > 0 and row["expert_read_gib"] > 0
            assert 1 <= row["experts_per_moe_layer"] <= row["batch"] * 2  # at most batch * k (k <= 2)
            for variant in ("hf", "opt", "opt_graphs", "opt_step_graphs")[: 4 if graphs else 3]:
                ms = row[f"{variant}_ms_per_token"]
                # CPU timings are noise: a step lost in host jitter is NaN (never negative), and so its ratio.
                assert isinstance(ms, float) and not ms < 0
                assert row[f"{variant}_x_floor"] == pytest.approx(ms / row["floor_ms"], nan_ok=True)
            assert row["step_tokens_equal_opt"] is (True if graphs else None)
    assert out.with_suffix(".png").exists()


def test_bench_model_records_why_step_graphs_are_unsupported(tmp_path, monkeypatch) -> None:
    """Through the CLI: a model whose decode steps cannot be captured whole gets the reason, not a time."""
    from hf_moe_opt import step_graphs
    from hf_moe_opt.cli import main

    monkeypatch.setattr(step_graphs, "NLLB_MIN_TRANSFORMERS", "999")
    out = tmp_path / "model.json"
    argv = ["bench", "model", "--cpu-smoke", "--models", "nllb-tiny", "--batches", "1", "--decode-batches", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["models"]
    assert "NLLB-MoE decode steps cannot be captured whole" in rec["step_graphs_unsupported"]
    assert rec["step_graph_counts"] is None
    (row,) = rec["decode"]
    assert row["opt_step_graphs_ms_per_token"] is None and row["opt_step_graphs_x_floor"] is None
    assert row["step_tokens_equal_opt"] is None and isinstance(row["opt_graphs_ms_per_token"], float)


def test_decode_floor_counts_what_a_step_reads() -> None:
    """Tiny Switch: a decode step reads the decoder's dense weights except the cross-attention keys and
    values (cached), the LM head, the experts it routes to, and the KV cache."""
    import torch

    import hf_moe_opt
    from hf_moe_opt.benchmarking.floors import GIB, decode_floor
    from hf_moe_opt.benchmarking.model import random_ids, random_model, tiny_config

    cfg = tiny_config("switch-tiny")
    model = random_model("switch-tiny", torch.device("cpu"), cfg)
    hf_moe_opt.optimize(model)
    batch, prompt, short, long = 2, 8, 2, 5
    ids = random_ids(model, batch, prompt, "cpu", torch.Generator().manual_seed(0))
    ceilings = {"memory_bytes_per_s": 1e9, "copy_bytes_per_s": 5e8, "bf16_flops_per_s": 1e12}
    f = decode_floor(model, ids, short, long, ceilings)
    d, inner, layers, elt = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_decoder_layers, 2
    # Per layer: self-attention q, k, v, o; cross-attention q, o; the router; three norms. Then the final
    # norm and the LM head.
    dense = (layers * (6 * d * inner + d * cfg.num_experts + 3 * d) + d + cfg.vocab_size * d) * elt
    lookups = (batch * d + 32 * cfg.num_heads) * elt  # at most: token rows, relative-position bias rows
    expert = 2 * d * cfg.d_ff * elt
    assert f["expert_read_gib"] * GIB == pytest.approx(sum(f["distinct_experts_per_layer"].values()) * expert)
    assert dense <= (f["weight_read_gib"] - f["expert_read_gib"]) * GIB <= dense + lookups
    # Self-attention: decoder positions 1 + i at forward i (i = short .. long - 1); cross: the prompt.
    per_position = layers * 2 * batch * inner * elt
    mean_positions = sum(1 + i for i in range(short, long)) / (long - short)
    assert f["kv_read_gib"] * GIB == pytest.approx(per_position * (mean_positions + prompt))
    assert f["floor_ms"] == pytest.approx(1e3 * f["read_gib"] * GIB / ceilings["memory_bytes_per_s"])
    # Results written before the read-only streams were measured carry the copy rate alone.
    old = decode_floor(model, ids, short, long, {"copy_bytes_per_s": 1e9, "bf16_flops_per_s": 1e12})
    assert old["floor_ms"] == pytest.approx(f["floor_ms"])
    # A beam search reads the cache of every beam: that of batch x beams sequences.
    beams = decode_floor(model, ids, short, long, ceilings, num_beams=2)
    assert beams["kv_read_gib"] == pytest.approx(2 * f["kv_read_gib"])
    assert beams["expert_read_gib"] >= f["expert_read_gib"]


def test_bench_cache_smoke(tmp_path) -> None:
    out = tmp_path / "cache.json"
    assert _load("bench_cache").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    on_gpu = torch.cuda.is_available()  # the smoke runs on the GPU where there is one
    assert result["smoke"] is True and (result["bandwidth"]["pinned_h2d_bytes_per_s"] is None) == (not on_gpu)
    assert {"environment", "bandwidth", "decode", "hit_rates", "model_decode"} <= result.keys()

    # The MoE-only stack (the earlier schema, labelled as the worst case).
    assert "worst case" in result["decode_setup"]
    assert {(r["family"], r["batch"], r["fraction_resident"]) for r in result["decode"]} == {
        (f, b, x) for f in ("switch", "nllb") for b in (1, 8) for x in (1.0, 0.5, 0.25)
    }
    for row in result["decode"]:
        assert row["ms_per_token"] > 0 and row["setup"] == "moe_stack_only"
        if row["fraction_resident"] < 1.0:
            assert 0.0 <= row["hit_rate"] <= 1.0 and row["bytes_copied"] >= 0
            assert row["x_resident"] > 0 and ("x_copy_floor" in row) == on_gpu  # no pinned bandwidth on CPU
            # Belady on the same routing: never fewer hits, never more bytes than the policy's.
            assert row["hit_rate"] <= row["belady_hit_rate"] + 1e-12
            assert row["belady_bytes_per_token"] <= row["bytes_copied_per_token"]
            assert ("belady_floor_ms_per_token" in row) == on_gpu
    assert {r["policy"] for r in result["decode"]} == {None, "lifo", "adaptive"}
    # A run of the stack part alone plots without the other parts' panels.
    pytest.importorskip("matplotlib")
    stack_only = {k: v for k, v in result.items() if k not in ("model_decode", "hit_rates")}
    _load("bench_cache").plot(stack_only, tmp_path / "stack.png")
    assert (tmp_path / "stack.png").stat().st_size > 0
    # Belady after a warm-up on the first step: with 1 slot the counted {0}, {1}, {0} are hit, miss, miss.
    steps = [frozenset({0}), frozenset({0}), frozenset({1}), frozenset({0})]
    assert _load("bench_cache").belady_misses(steps, 1, 2, warmup=1) == (1, 2)
    assert _load("bench_cache").belady_misses(steps, 2, 2, warmup=1) == (2, 1)  # {1} is a cold miss
    row = {"fraction_resident": 0.5}
    _load("bench_cache").add_belady_floor(row, [steps], [100], 2, 1, 2.0, 1e5)
    assert row["belady_hit_rate"] == pytest.approx(1 / 3) and row["belady_bytes_per_token"] == pytest.approx(200 / 3)
    assert row["belady_serial_ms_per_token"] == pytest.approx(2.0 + 1e3 * (200 / 3) / 1e5)
    assert row["belady_floor_ms_per_token"] == pytest.approx(2.0)
    # The copy floor: the resident time, or the bytes per token over the pinned bandwidth if longer.
    floor_row = {"ms_per_token": 3.0, "bytes_copied": 8e9}
    _load("bench_cache").add_copy_floor(floor_row, 1.0, 100, 40e9)
    assert floor_row["copy_floor_ms_per_token"] == pytest.approx(2.0)
    assert floor_row["x_copy_floor"] == pytest.approx(1.5)
    assert floor_row["x_resident"] == pytest.approx(3.0)

    # Whole models: every (model, batch) has the resident row and both policies at 50% and 25%.
    rows = result["model_decode"]
    assert "random" in result["model_decode_setup"]["inputs"]
    keys = {(r["model"], r["batch"], r["fraction_resident"], r["policy"]) for r in rows}
    assert keys == {
        (m, b, f, p)
        for m in ("switch-base-128", "nllb-moe-54b")
        for b in (1, 8)
        for f, p in [(1.0, None), (0.5, "lifo"), (0.5, "lfru"), (0.25, "lifo"), (0.25, "lfru")]
    }
    resident = {(r["model"], r["batch"]): r for r in rows if r["fraction_resident"] == 1.0}
    for row in rows:
        base = resident[(row["model"], row["batch"])]
        assert row["ms_per_new_token"] > 0 and row["new_tokens"] == 4
        assert row["ratio_to_resident"] == pytest.approx(row["ms_per_new_token"] / base["ms_per_new_token"])
        assert row["tokens_equal_resident"] is True  # the cache changes nothing
        if row["fraction_resident"] < 1.0:
            assert 0.0 <= row["hit_rate"] <= 1.0 and 0.0 <= row["decoder_hit_rate"] <= 1.0
            assert row["bytes_copied"] >= 0 and row["slot_bytes"] > 0
            # No pinned bandwidth without CUDA; no copy rate where nothing was copied.
            assert (row["copy_vs_pinned_bandwidth"] is None) == (not on_gpu or row["bytes_copied"] == 0)
    # 25% of 8 experts is 2 slots: some step needs more than that, so something is copied.
    assert any(r["bytes_copied"] > 0 for r in rows if r["fraction_resident"] == 0.25)
    assert out.with_suffix(".png").exists()


def test_bench_placement_smoke(tmp_path) -> None:
    """One process over two CPU "devices" and 2-rank gloo expert parallelism, each plan equal to one device."""
    out = tmp_path / "placement.json"
    prof = tmp_path / "profile.txt"
    assert _load("bench_placement").main(["--smoke", "--out", str(out), "--profile", str(prof)]) == 0
    # One profiled call per shape and plan, in each part.
    assert prof.read_text().count("==== single process") == 6
    assert prof.read_text().count("==== expert parallel rank 0") == 6
    result = json.loads(out.read_text())
    for part, rows in (("single_process", "tokens"), ("expert_parallel", "tokens_per_rank")):
        assert set(result[part]) == {"switch-tiny", "nllb-tiny"}
        for entry in result[part].values():
            assert set(entry["plans"]) == {"round_robin", "greedy", "replicate"}
            for plan in entry["plans"].values():
                assert plan["max_abs_err_vs_one_gpu"] < 1e-5
                assert plan["held_out"]["avg_max_over_mean"] >= 1.0
            for row in entry[rows].values():
                assert row["round_robin"]["ms"] > 0 and row["balanced_over_round_robin"] > 0
    # The roofline model counts every kept row once, on some device, whatever the plan.
    for name, entry in result["single_process"].items():
        top_k = 1 if name.startswith("switch") else 2
        for t, row in entry["tokens"].items():
            for s in ("round_robin", "greedy", "replicate"):
                model = row[s]["model"]
                assert sum(model["rows_per_device"]) == int(t) * top_k
                assert model["ms"] == max(model["per_device_ms"]) > 0
            assert row["balanced_over_round_robin_model"] > 0
            ep = entry["ep_model"][t]
            assert sum(ep["greedy"]["rows_per_device"]) == 2 * int(t) * top_k


def test_bench_ep_scaling_smoke(tmp_path) -> None:
    """Model-level expert parallelism with two gloo ranks (four and eight: test_expert_parallel.py): every
    plan's encoder output equals one device's."""
    out = tmp_path / "ep.json"
    assert _load("bench_ep_scaling").main(["--smoke", "--ranks", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["smoke"]
    assert set(result["strategies"]) == {"round_robin", "greedy"}
    for entry in result["strategies"].values():
        assert entry["max_abs_err_vs_one_gpu"] < 1e-5
        assert entry["profiled_balance"]["avg_max_over_mean"] >= 1.0
        for batch, row in entry["batches"].items():
            assert len(row["ms_per_rank"]) == 2 and min(row["ms_per_rank"]) > 0
            # Both ranks' tokens over the slower rank's time.
            slowest_s = max(row["ms_per_rank"]) * 1e-3
            assert row["tokens_per_s"] == pytest.approx(2 * int(batch) * result["seq"] / slowest_s)
            assert all(a > 0 for a in row["all_to_all_ms_per_layer_call"])
            # The N-rank floor keeps every FLOP of a rank's tokens: never below the one-GPU matmul term.
            one = result["one_gpu"][batch]
            flop_ms = one["floor"]["tflop"] * 1e12 / result["ceilings"]["bf16_flops_per_s"] * 1e3
            assert flop_ms <= row["floor_ms"] * (1 + 1e-9) and row["floor_ms"] <= one["floor"]["floor_ms"] * (1 + 1e-9)
            assert row["x_floor"] == pytest.approx(max(row["ms_per_rank"]) / row["floor_ms"])
    for one in result["one_gpu"].values():
        assert one["floor"]["floor_ms"] > 0 and one["x_floor"] == pytest.approx(one["ms"] / one["floor"]["floor_ms"])
    assert (tmp_path / "ep.png").exists()


def test_decode_step_time_lost_in_noise_is_nan_not_negative(monkeypatch):
    import math

    import torch

    from hf_moe_opt.benchmarking import model as bench_model

    times = iter([5.0, 4.0])  # the longer generation measured faster than the shorter one
    monkeypatch.setattr(bench_model, "median_ms", lambda *a, **k: next(times))
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.warns(UserWarning, match="timing noise"):
        step = bench_model.decode_ms_per_token(None, 1, torch.device("cpu"), ids=ids)
    assert math.isnan(step)
    times = iter([4.0, 8.0])
    monkeypatch.setattr(bench_model, "median_ms", lambda *a, **k: next(times))
    assert bench_model.decode_ms_per_token(None, 1, torch.device("cpu"), ids=ids) == 0.25  # (8 - 4) / (20 - 4)


def test_tuner_candidates_pair_tma_and_fit_shared_memory() -> None:
    pytest.importorskip("triton")
    tune = _load("tune_triton")
    large = list(tune._candidates(512, quick=False, gated=True, tma="both", group_ms=(4, 8)))
    # Every large-batch candidate comes with and without TMA and with each GROUP_M.
    plain = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) for c in large}
    assert len(large) == 4 * len(plain)
    assert {(c.tma, c.group_m) for c in large} == {(0, 4), (0, 8), (1, 4), (1, 8)}
    for c in large:  # gated W1: two weight tiles per stage within the budget
        assert (c.block_m + 2 * c.block_n) * c.block_k * 2 * c.num_stages <= 200 * 1024
    # Deep K tiles of small batches span more than one 128-byte swizzle: never TMA.
    small = list(tune._candidates(2, quick=False, gated=False, split=True, tma="only"))
    assert small and all(c.tma == 0 and c.block_k * 2 > 128 for c in small)
    assert all(c.tma == 0 for c in tune._candidates(512, quick=False, gated=False, tma="off"))
    # GEMM2 (split) also tries TMA for its weights alone.
    assert {c.tma for c in tune._candidates(512, quick=False, gated=False, split=True, tma="both")} == {0, 1, 2}


def test_tuner_tail_m_candidates() -> None:
    pytest.importorskip("triton")
    tune = _load("tune_triton")
    plain = list(tune._candidates(512, quick=False, gated=False, split=True))
    assert plain and all(c.tail_m == 0 for c in plain)  # off unless asked for
    both = list(tune._candidates(512, quick=False, gated=False, split=True, tail_ms=(0, 64)))
    # Each candidate with and without 64-row tails where BLOCK_M is taller; 64-row tiles only without.
    assert len(both) == len(plain) + sum(c.block_m > 64 for c in plain)
    assert {(c.block_m, c.tail_m) for c in both} == {(64, 0), (128, 0), (128, 64)}
    import torch

    args = tune.argparse.Namespace(
        block_m=None, num_warps=None, tma="off", group_m=[8], tail_m=[0, 32], persistent=[0], flatten=[1]
    )
    assert tune._filters(args, torch.bfloat16)["tail_ms"] == (0, 32)


def test_tuner_persistent_candidates() -> None:
    pytest.importorskip("triton")
    tune = _load("tune_triton")
    plain = list(tune._candidates(512, quick=False, gated=False, split=True))
    assert plain and all(c.persistent == 0 for c in plain)  # off unless asked for
    looped = list(
        tune._candidates(
            512, quick=False, gated=False, split=True, tail_ms=(0, 64), persistents=(0, 2), flattens=(0, 1)
        )
    )
    one_per_tile = [c for c in looped if c.persistent == 0]
    # Each unsplit candidate also persistent, flattened and not, with and without tail tiles; never split.
    assert len(looped) == len(one_per_tile) + 2 * sum(c.split_k == 1 for c in one_per_tile)
    assert all(c.split_k == 1 for c in looped if c.persistent)
    assert {(c.persistent, c.flatten, c.tail_m) for c in looped if c.block_m == 128} == {
        (p, f, t) for (p, f) in ((0, 1), (2, 0), (2, 1)) for t in (0, 64)
    }
    import torch

    args = tune.argparse.Namespace(
        block_m=None, num_warps=None, tma="off", group_m=[8], tail_m=[0], persistent=[0, 1], flatten=[0, 1]
    )
    assert tune._filters(args, torch.bfloat16)["persistents"] == (0, 1)


def test_policy_bounds_smoke(tmp_path) -> None:
    from hf_moe_opt.cache import synthetic_trace
    from hf_moe_opt.cache.traces import synthetic_steps

    # The steps with their draw distributions are the trace synthetic_trace returns.
    drawn = list(synthetic_steps(16, 2, 4, 50, 1.0, 0.5, 20, 3))
    trace = synthetic_trace(16, 2, 4, 50, zipf_s=1.0, stickiness=0.5, reshuffle_every=20, seed=3)
    assert tuple(s for s, _, _ in drawn) == trace.steps and tuple(c for _, c, _ in drawn) == trace.counts
    assert all(abs(float(m.sum()) - 1.0) < 1e-9 for _, _, m in drawn)
    out = tmp_path / "bounds.json"
    settings = ["reshuffle 200", "fixed popularity", "nllb-moe-54b stack, batch 8"]
    argv = ["--out", str(out), "--steps", "150", "--seeds", "0", "1", "--settings", *settings, "--jobs", "1"]
    module = _load("policy_bounds")
    assert module.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["setting"], r["seed"]) for r in rows] == [(s, seed) for s in settings for seed in (0, 1)]
    policies = {"lfu", "lfru", "adaptive", "changepoint", "lfru_ensemble"}
    for row in rows:  # Belady is optimal: no online policy, not even the oracles, beats it
        oracle = set() if "stack" in row["setting"] else {"oracle_next", "told_changes"}
        assert set(row["belady_minus"]) == policies | oracle
        assert all(gap >= 0 for gap in row["belady_minus"].values())
    # A stack trace: top-2 of 128 experts for 8 tokens per step, the same for the same seed.
    trace = module.stack_trace("nllb-moe-54b", 8, 20, seed=5)
    assert trace.num_experts == 128 and all(sum(c) == 16 for c in trace.counts)
    assert (
        trace == module.stack_trace("nllb-moe-54b", 8, 20, seed=5) != module.stack_trace("nllb-moe-54b", 8, 20, seed=6)
    )
    assert set(result["summary"]) == set(settings)
    for setting, gaps in result["summary"].items():
        mine = [r["belady_minus"]["changepoint"] for r in rows if r["setting"] == setting]
        assert gaps["changepoint"]["max"] == max(mine)


def test_profile_cache_step_smoke(capsys) -> None:
    args = ["--smoke", "--steps", "6", "--top", "100000", "--policy", "lifo", "--prefetch"]
    assert _load("profile_cache_step").main(args) == 0
    out = capsys.readouterr().out
    # Every setting reports a time per step and a profile (every function listed) that includes the
    # cached store's step; the look-ahead's includes its guess.
    assert out.count("ms per step") == 3 and "resident, lifo" in out
    assert "_step" in out.split("resident, lifo")[1]
    assert "_guess" in out.split("look-ahead")[1]


@pytest.mark.parametrize("n, k, block", [(48, 768, (16, 512, 8)), (33, 256, (16, 256, 4)), (1, 100, (64, 128, 4))])
def test_zero_copy_probe_product_is_right(n, k, block):
    """The probe's one-token product over a matrix given by its address, on odd shapes: interpreted on a
    CPU; on a GPU from device memory and from pinned host memory (the probe's point)."""
    pytest.importorskip("triton")
    import torch

    from hf_moe_opt.kernels import kernels_interpreted

    if kernels_interpreted():
        places = [("cpu", lambda t: t)]
    elif torch.cuda.is_available():
        places = [("cuda", lambda t: t.cuda()), ("cuda", lambda t: t.pin_memory())]
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    probe = _load("probe_zero_copy")
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(k, generator=g).to(torch.bfloat16)
    for device, place in places:
        placed = place(w)  # kept alive while the kernel reads it by address
        y = probe.gemv(placed.data_ptr(), x.to(device), n, k, block)
        torch.testing.assert_close(y.cpu(), w.float() @ x.float(), rtol=1e-4, atol=1e-3)


def test_backend_agreement_probe_smoke(tmp_path) -> None:
    out = tmp_path / "agree.json"
    assert _load("probe_backend_agreement").main(["--smoke", "--out", str(out)]) == 0
    pairs = json.loads(out.read_text())["pairs"]
    on_gpu = torch.cuda.is_available()
    gpu_pairs = {"torch vs triton", "torch vs float32", "triton vs float32"}
    assert set(pairs) == (gpu_pairs if on_gpu else {"torch vs float32"})
    for row in pairs.values():
        # bf16 against float32 is never equal, and no difference exceeds the largest one.
        assert 0.0 < row["mean_abs"] <= row["max_abs"] and 0.0 <= row["tokens_moved_over_1pct"] <= 1.0


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="with 2+ GPUs the script would run the measurements")
def test_multi_gpu_script_refuses_fewer_than_two_gpus(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "multi_gpu.sh"), "ep", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs at least 2 CUDA GPUs" in proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_slot_lookup_probe_smoke(tmp_path) -> None:
    """Both cached variants run the same steps with the same outputs; ratios and a plot are written."""
    out = tmp_path / "slot_lookup.json"
    argv = ["--smoke", "--warmup", "3", "--steps", "6", "--block", "3", "--families", "switch"]
    assert _load("probe_slot_lookup").main([*argv, "--fractions", "0.5", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["blocks"] == 2 and row["output_mismatches"] == 0
    assert set(row["x_resident_block_median"]) == {"kernel_lookup", "index_first"}
    assert row["hit_rate"]["kernel_lookup"] == row["hit_rate"]["index_first"] > 0
    assert all(v > 0 for v in row["ms_per_token"].values())
    assert out.with_suffix(".png").exists()


def test_fast_launch_probe_smoke(tmp_path, monkeypatch) -> None:
    """Both launch paths run the same steps with the same outputs; ratios and a plot are written."""
    from hf_moe_opt.kernels import launch

    monkeypatch.setenv(launch.ENV_VAR, "1")  # the probe flips it; leave it as found
    out = tmp_path / "fast_launch.json"
    argv = ["--smoke", "--warmup", "2", "--steps", "6", "--block", "3", "--call-blocks", "1", "--families", "nllb"]
    assert _load("probe_fast_launch").main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (call,) = result["calls"]
    assert set(call["host_us"]) == {"direct", "triton"} and all(v > 0 for v in call["host_us"].values())
    (row,) = result["stack"]
    assert row["blocks"] == 2 and row["output_mismatches"] == 0
    assert set(row["ms_per_token"]) == {"resident/direct", "resident/triton", "cached/direct", "cached/triton"}
    assert set(row["cached_over_resident"]) == set(row["hit_rate"]) == {"direct", "triton"}
    assert row["hit_rate"]["direct"] == row["hit_rate"]["triton"] > 0
    assert out.with_suffix(".png").exists()


def test_host_reads_probe_smoke(tmp_path) -> None:
    """The three builds run the same steps with the resident outputs; read mode reads over the link."""
    from hf_moe_opt.kernels import kernels_interpreted

    if not torch.cuda.is_available() and not kernels_interpreted():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    out = tmp_path / "host_reads.json"
    argv = ["--smoke", "--warmup", "2", "--steps", "4", "--block", "2", "--families", "nllb", "--fractions", "0.5"]
    assert _load("probe_host_reads").main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["blocks"] == 2 and set(row["x_resident"]) == {"copy", "read"}
    assert row["max_abs_diff_vs_resident"] == {"copy": 0.0, "read": 0.0}
    assert row["host_reads_per_token"]["copy"] == 0 < row["host_reads_per_token"]["read"]
    assert out.with_suffix(".png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("script", ["probe_fast_launch", "probe_slot_lookup", "probe_host_reads"])
def test_stack_probes_need_cuda(script, capsys) -> None:
    """Without --smoke the stack probes time the GPU: without one they fail and say why."""
    assert _load(script).main(["--steps", "1"]) == 1
    assert f"{script}.py needs CUDA" in capsys.readouterr().err


def test_copy_dma_probe_plot(tmp_path) -> None:
    """The probe needs CUDA (it says so and exits 0 without); its plot reads saved results."""
    probe = _load("probe_copy_dma")
    if not torch.cuda.is_available():
        assert probe.main(["--steps", "1"]) == 0
    trace = {"dma_bytes_per_s": 50e9, "batch_span_bytes_per_s": 48e9}
    saved = []
    for family in ("switch", "nllb"):
        result = {"family": family, "batch": 1, "pinned_h2d_bytes_per_s": 55e9, "events_bytes_per_s": 45e9}
        path = tmp_path / f"copy_dma_{family}.json"
        path.write_text(json.dumps({**result, "environment": {"device": "test"}, "trace": trace}))
        saved.append(str(path))
    assert probe.main(["--replot", *saved]) == 0
    assert (tmp_path / "copy_dma_switch.png").exists()


def test_read_probe_streams_its_weights() -> None:
    """The bandwidth probes' kernel calls compute the layers they claim to (so they read every weight
    byte they count), and they time nothing off a GPU."""
    pytest.importorskip("triton")
    from hf_moe_opt.benchmarking.read_probe import grouped_probe_inputs, probe_inputs, read_rates
    from hf_moe_opt.dispatch import make_plan
    from hf_moe_opt.experts.torch_backend import torch_moe_ffn
    from hf_moe_opt.kernels import kernels_interpreted, moe_ffn
    from hf_moe_opt.kernels.gemv import gemv_moe_ffn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not kernels_interpreted():
        pytest.skip("needs a GPU or the triton interpreter")
    args, nbytes = probe_inputs(device, experts=3, hidden=32, ffn=64)
    x, index, gates, keep, w1, b1, w2, b2, act = args
    assert nbytes == 2 * 3 * 32 * 64 * 2
    expected = torch_moe_ffn(x, make_plan(index, gates, keep, 3), w1, b1, w2, b2, act)
    torch.testing.assert_close(gemv_moe_ffn(*args).float(), expected.float(), atol=1e-4, rtol=1e-2)

    args, nbytes = grouped_probe_inputs(device, experts=4, hidden=32, ffn=64, rows=3)
    x, plan, w1, b1, w2, b2, act = args
    assert nbytes == 2 * 4 * 32 * 64 * 2 and x.shape == (12, 32)
    assert plan.counts.tolist() == [3, 3, 3, 3]  # every expert (so every weight byte) is used
    expected = torch_moe_ffn(*args)
    torch.testing.assert_close(moe_ffn(*args).float(), expected.float(), atol=1e-4, rtol=1e-2)

    rates = read_rates(device, lambda fn: 1.0)
    assert sorted(rates) == (["decode", "grouped"] if device.type == "cuda" else [])
    assert all(r > 0 for r in rates.values())


@pytest.mark.parametrize(("script", "bad"), [("bench_layer.py", "folder"), ("bench_cache.py", "r.png")])
def test_benchmark_out_is_checked_before_work(script: str, bad: str, tmp_path) -> None:
    """A folder or a non-JSON name for ``--out`` stops a benchmark at once (argparse, exit 2), not
    after a long run; a JSON name in a folder that does not exist yet is accepted (created on write)."""
    import argparse

    from hf_moe_opt.benchmarking.common import json_out

    assert json_out(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    for bad in (str(tmp_path), str(tmp_path / "r.png")):
        with pytest.raises(argparse.ArgumentTypeError):
            json_out(bad)
    out = tmp_path if bad == "folder" else tmp_path / bad
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "--out" in proc.stderr, proc.stderr[-500:]


def _switch_all_to_expert_zero(capacity: int):
    """Tiny optimized Switch whose routers are zero: every logit ties, so every token picks expert 0, and
    a sequence keeps its first ``capacity`` tokens (the rest are dropped)."""
    import hf_moe_opt
    from hf_moe_opt.api import optimized_layers
    from hf_moe_opt.benchmarking.model import random_model, tiny_config

    cfg = tiny_config("switch-tiny")
    cfg.expert_capacity = capacity
    model = random_model("switch-tiny", torch.device("cpu"), cfg)
    hf_moe_opt.optimize(model)
    with torch.no_grad():
        for _, layer in optimized_layers(model):
            for p in layer.router.parameters():
                p.zero_()
    return model, cfg


def test_encoder_floor_counts_by_hand() -> None:
    """encoder_floor of a tiny Switch, every term counted by hand: each dense weight once (the router
    once, though both the MoE layer and its classifier are called), the distinct embedding rows looked
    up (token ids and relative-position buckets, not the tables, not every lookup), per MoE layer the
    distinct experts reached by kept assignments only, 2 FLOPs per matrix element per row (experts: per
    kept assignment), 4 * L * B * S^2 * H * d_kv attention-score FLOPs; the floor is the larger of
    bytes / bandwidth and FLOPs / matmul rate, and names which one it is."""
    from hf_moe_opt.benchmarking.floors import GIB, ReadTracer, encoder_floor

    capacity = 2
    model, cfg = _switch_all_to_expert_zero(capacity)
    ids = torch.tensor([[5, 5, 6, 7, 5, 9], [5, 6, 6, 9, 10, 11]])  # 6 distinct ids in 12 lookups
    batch, seq = ids.shape
    d, inner, heads, num_e, ff, layers, elt = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads, 8, 64, 2, 2
    # Per layer q, k, v, o, the router, two norms; then the final norm.
    dense = layers * (4 * d * inner + d * num_e + 2 * d) + d
    token_rows = 6 * d
    bucket_rows = (2 * seq - 1) * heads  # bidirectional relative positions -5..5, all exact buckets
    weight_bytes = (dense + token_rows + bucket_rows) * elt
    kept = batch * capacity  # per layer: each sequence keeps its first `capacity` tokens, all on expert 0
    expert_bytes = layers * 1 * (2 * d * ff) * elt
    matmul = layers * (2 * batch * seq * (4 * d * inner + d * num_e) + 2 * kept * 2 * d * ff)
    scores = 4 * layers * batch * seq * seq * heads * cfg.d_kv

    encoder = model.get_encoder()
    with ReadTracer(model, encoder) as tracer, torch.no_grad():
        encoder(input_ids=ids)
    (reads,) = tracer.reads()
    assert reads.weight_bytes == weight_bytes and reads.expert_bytes == expert_bytes
    assert reads.matmul_flops == matmul
    assert set(reads.experts_per_layer.values()) == {1} and set(reads.kept_per_layer.values()) == {kept}

    bw = {"memory_bytes_per_s": 1e9, "copy_bytes_per_s": 1.0, "bf16_flops_per_s": 1e12}
    f = encoder_floor(model, ids, bw)
    assert f["read_gib"] * GIB == pytest.approx(weight_bytes + expert_bytes)
    assert f["expert_read_gib"] * GIB == pytest.approx(expert_bytes)
    assert f["tflop"] * 1e12 == pytest.approx(matmul + scores)
    assert f["experts_per_moe_layer"] == 1
    assert f["floor_bound"] == "bandwidth"
    assert f["floor_ms"] == pytest.approx(1e3 * (weight_bytes + expert_bytes) / 1e9)
    mm = {"memory_bytes_per_s": 1e9, "bf16_flops_per_s": 1e7}
    f = encoder_floor(model, ids, mm)
    assert f["floor_bound"] == "matmul"
    assert f["floor_ms"] == pytest.approx(1e3 * (matmul + scores) / 1e7)


def test_tied_lm_head_reads_the_embedding_table_once() -> None:
    """Where the LM head is the embedding table, a forward reads the whole table once (as the head)
    and no looked-up rows on top; without cache the decoder's cross-attention keys and values are
    computed, so they count."""
    from hf_moe_opt.benchmarking.floors import ReadTracer

    model, cfg = _switch_all_to_expert_zero(64)
    for emb in (model.encoder.embed_tokens, model.decoder.embed_tokens, model.lm_head):
        emb.weight = model.shared.weight
    ids = torch.tensor([[5, 5, 6, 7], [8, 6, 6, 9]])
    dec = torch.tensor([[0, 3, 3], [0, 4, 5]])
    d, inner, heads, num_e, layers, elt = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads, 8, 2, 2
    encoder = layers * (4 * d * inner + d * num_e + 2 * d) + d
    decoder = layers * (8 * d * inner + d * num_e + 3 * d) + d  # self and cross q, k, v, o; three norms
    head = cfg.vocab_size * d
    buckets = (2 * ids.shape[1] - 1) * heads + dec.shape[1] * heads  # bidirectional, then causal
    with ReadTracer(model, model) as tracer, torch.no_grad():
        model(input_ids=ids, decoder_input_ids=dec, use_cache=False)
    (reads,) = tracer.reads()
    assert reads.weight_bytes == (encoder + decoder + head + buckets) * elt


def test_floors_of_a_causal_lm_count_by_hand() -> None:
    """Tiny Qwen3-MoE (GQA, GLU experts, untied head), batch 1: the prefill's floor counts the head over
    every row and causal attention scores, 4 * L * B * S(S+1)/2 * H * d_head; a decode step reads the
    dense weights, one token row, 3 * d * f per distinct expert, and the keys and values (KV heads only)
    of prompt + i positions at forward i, averaged over forwards short .. long - 1 (not the prefill)."""
    import hf_moe_opt
    from hf_moe_opt.benchmarking.floors import GIB, decode_floor, encoder_floor
    from hf_moe_opt.benchmarking.model import random_model, tiny_config

    cfg = tiny_config("qwen3-tiny")
    model = random_model("qwen3-tiny", torch.device("cpu"), cfg)
    hf_moe_opt.optimize(model)
    ids = torch.tensor([[5, 5, 6, 7, 5, 9]])
    seq = ids.shape[1]
    d, heads, kv_heads, hd, layers, k, elt = 32, 4, 2, 8, 2, 2, 2
    ff, num_e, vocab = cfg.moe_intermediate_size, cfg.num_experts, cfg.vocab_size
    matrices = heads * hd * d * 2 + kv_heads * hd * d * 2 + num_e * d  # q, o; k, v; router
    dense = layers * (matrices + 2 * hd + 2 * d) + d + vocab * d  # + q/k norms, two norms; final norm, head
    per_expert = 3 * d * ff * elt
    ceilings = {"memory_bytes_per_s": 1e9, "bf16_flops_per_s": 1e12}

    f = encoder_floor(model, ids, ceilings)
    assert f["read_gib"] * GIB == pytest.approx((dense + 4 * d) * elt + f["expert_read_gib"] * GIB)
    assert f["expert_read_gib"] * GIB == pytest.approx(f["experts_per_moe_layer"] * layers * per_expert)
    matmul = 2 * seq * (layers * matrices + vocab * d) + layers * 2 * seq * k * 3 * d * ff
    scores = 4 * layers * 1 * seq * (seq + 1) / 2 * heads * hd
    assert f["tflop"] * 1e12 == pytest.approx(matmul + scores)

    short, long = 1, 4
    f = decode_floor(model, ids, short, long, ceilings)
    assert (f["weight_read_gib"] - f["expert_read_gib"]) * GIB == pytest.approx((dense + d) * elt)
    assert f["expert_read_gib"] * GIB == pytest.approx(sum(f["distinct_experts_per_layer"].values()) * per_expert)
    assert all(1 <= n <= k for n in f["distinct_experts_per_layer"].values())  # one token: at most k
    per_position = layers * 2 * kv_heads * hd * elt
    mean_positions = sum(seq + i for i in range(short, long)) / (long - short)
    assert f["kv_read_gib"] * GIB == pytest.approx(per_position * mean_positions)


def test_expert_bytes_count_the_biases() -> None:
    """An expert with biases (NLLB-MoE) reads both matrices and both bias vectors: (2 d f + d + f) elements."""
    import hf_moe_opt
    from hf_moe_opt.benchmarking.floors import ReadTracer
    from hf_moe_opt.benchmarking.model import random_model, tiny_config

    cfg = tiny_config("nllb-tiny")
    model = random_model("nllb-tiny", torch.device("cpu"), cfg)
    hf_moe_opt.optimize(model)
    encoder = model.get_encoder()
    with ReadTracer(model, encoder) as tracer, torch.no_grad():
        encoder(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]))
    (reads,) = tracer.reads()
    d, ff = cfg.d_model, cfg.encoder_ffn_dim
    assert (
        reads.experts_per_layer
        and reads.expert_bytes == sum(reads.experts_per_layer.values()) * (2 * d * ff + d + ff) * 2
    )


def test_attention_score_flops_by_hand() -> None:
    """QK^T and AV: 2 FLOPs per multiply-add each, 4 * L * B * pairs * H * d_head, with all S^2 pairs in an
    encoder and S(S+1)/2 in a causal prefill; d_head is d_kv (Switch), head_dim (Qwen3) or d_model / H
    (NLLB); 0 where the config lacks the sizes."""
    from types import SimpleNamespace

    from hf_moe_opt.benchmarking.floors import attention_score_flops
    from hf_moe_opt.benchmarking.model import tiny_config

    b, s = 3, 5
    switch = tiny_config("switch-tiny")  # 2 layers, 4 heads, d_kv 8 (d_model 32)
    switch.d_kv = 16  # not d_model / heads: d_kv must win
    assert attention_score_flops(switch, b, s, encoder=True) == 4 * 2 * b * s * s * 4 * 16
    nllb = tiny_config("nllb-tiny")  # 2 encoder layers, 4 heads, d_model 32
    assert attention_score_flops(nllb, b, s, encoder=True) == 4 * 2 * b * s * s * 4 * 8
    qwen = tiny_config("qwen3-tiny")  # 2 layers, 4 heads, head_dim 8
    assert attention_score_flops(qwen, b, s, encoder=False) == 4 * 2 * b * (s * (s + 1) / 2) * 4 * 8
    assert attention_score_flops(SimpleNamespace(d_model=32), b, s, encoder=True) == 0


def test_measure_ceilings_takes_the_fastest_stream(monkeypatch) -> None:
    """memory_bytes_per_s is the fastest of the copy (2 bytes moved per byte) and every read-only stream;
    read_bytes_per_s the fastest read-only stream (not their sum); each probe keeps its own rate; the
    matmul rate is 2 m^3 FLOPs per product."""
    from hf_moe_opt.benchmarking import common

    numel, m = 1 << 12, 8
    nbytes = numel * 2
    # The copy moves 2 * nbytes per 1 ms (16.4 MB/s): first a probe beats it, then the copy is fastest.
    for times, probes in (((1.0, 4.0, 8.0, 2.0), {"decode": 5e7}), ((1.0, 8.0, 4.0, 2.0), {"decode": 1e6})):
        # median_ms is called for the copy, the sum, the matrix-vector product, then the matmul.
        it = iter(times)
        monkeypatch.setattr(common, "median_ms", lambda *a, it=it, **kw: next(it))
        monkeypatch.setattr(common, "read_rates", lambda device, time_ms, probes=probes: dict(probes))
        c = common.measure_ceilings(torch.device("cpu"), copy_numel=numel, matmul_size=m)
        copy, summed, gemv = 2 * nbytes / 1e-3, nbytes / (times[1] * 1e-3), nbytes / (times[2] * 1e-3)
        reads = max(summed, gemv, probes["decode"])
        assert c["copy_bytes_per_s"] == pytest.approx(copy)
        assert c["read_bytes_per_s"] == pytest.approx(reads)
        assert c["memory_bytes_per_s"] == pytest.approx(max(copy, reads))
        assert c["decode_read_bytes_per_s"] == probes["decode"]
        assert c["bf16_flops_per_s"] == pytest.approx(2 * m**3 / 2e-3)


def test_layer_floor_helpers_by_hand() -> None:
    """floor_ms: active experts' bf16 bytes (2 d f, + d + f with biases) over the bandwidth, or 2 FLOPs
    per element per assignment over the matmul rate, whichever is longer; the GLU families' floor uses
    3 d f; memory_bandwidth prefers the fastest stream to the copy; add_floor_ratios divides every
    other *_ms by floor_ms and gives floor_ms no ratio of its own."""
    from hf_moe_opt.benchmarking import families
    from hf_moe_opt.benchmarking.common import add_floor_ratios, floor_ms, memory_bandwidth

    d, f = 4, 8
    c = {"memory_bytes_per_s": 1e3, "copy_bytes_per_s": 1.0, "bf16_flops_per_s": 1e9}
    assert memory_bandwidth(c) == 1e3 and memory_bandwidth({"copy_bytes_per_s": 7.0}) == 7.0
    assert floor_ms(3, d, f, 5, c) == pytest.approx(1e3 * 3 * 2 * d * f * 2 / 1e3)
    assert floor_ms(3, d, f, 5, c, bias=True) == pytest.approx(1e3 * 3 * (2 * d * f + d + f) * 2 / 1e3)
    assert families.floor_ms(3, d, f, 5, c) == pytest.approx(1e3 * 3 * 3 * d * f * 2 / 1e3)
    slow = {"memory_bytes_per_s": 1e12, "bf16_flops_per_s": 1e3}  # matmul-bound
    assert floor_ms(3, d, f, 5, slow) == pytest.approx(1e3 * 2 * 5 * 2 * d * f / 1e3)
    assert families.floor_ms(3, d, f, 5, slow) == pytest.approx(1e3 * 2 * 5 * 3 * d * f / 1e3)
    row = {"floor_ms": 2.0, "hf_ms": 6.0, "opt_ms": 3.0, "tokens": 4}
    add_floor_ratios(row)
    assert row == {"floor_ms": 2.0, "hf_ms": 6.0, "opt_ms": 3.0, "tokens": 4, "hf_x_floor": 3.0, "opt_x_floor": 1.5}


@pytest.mark.parametrize("family", ["mixtral", "llama4"])
def test_families_bench_reads_each_blocks_routing(family) -> None:
    """The families benchmark counts active experts from the HF block's own router (Mixtral's
    ``(logits, weights, indices)``, Llama 4's ``(scores, logits)``) and compares hidden states
    whichever the block returns; its Llama 4 shapes are the released ones."""
    from hf_moe_opt.benchmarking import families
    from tests.test_families import _blocks, tiny_model

    block = _blocks(tiny_model(family), family)[-1]
    k = 2
    x = torch.randn(9, 32)
    with torch.no_grad():
        chosen = families._chosen_experts(block, x, k)
        out = block(x.unsqueeze(0))
    logits = block.gate(x)[0] if family == "mixtral" else block.router(x)[1]
    assert chosen.shape == (9, k)
    assert torch.equal(chosen.sort(1).values, torch.topk(logits, k, dim=1).indices.sort(1).values)
    assert families._hidden(out).shape[-1] == 32 and isinstance(families._hidden(out), torch.Tensor)
    scout, maverick = families.FAMILY_SHAPES["llama4-scout"][3], families.FAMILY_SHAPES["llama4-maverick"][3]
    assert (scout["num_local_experts"], maverick["num_local_experts"]) == (16, 128)
    assert scout["hidden_size"] == 5120 and scout["intermediate_size"] == 8192 and scout["num_experts_per_tok"] == 1


def test_families_bench_builds_deepseek_v4() -> None:
    """DeepSeek-V4's block takes a layer index: the benchmark builds its learned-routing block at the
    default config's shape (on the meta device here) and counts its shared expert in the floor."""
    from hf_moe_opt.benchmarking import families

    if getattr(transformers, "DeepseekV4Config", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V4")
    block, config = families.build_block("deepseek-v4", torch.device("meta"))
    assert type(block.gate).__name__ == "DeepseekV4TopKRouter"
    assert families._dims(config) == (256, 4096, 2048, 6)
    assert tuple(block.experts.gate_up_proj.shape) == (256, 2 * 2048, 4096)
    assert "deepseek-v4" in families.SHARED_EXPERT


@pytest.mark.parametrize("name", ["switch-base-128", "nllb-moe-54b", "qwen3-30b-a3b"])
def test_random_model_keeps_tied_weights_tied(name):
    """The benchmarks' random models share the embedding and the LM head exactly where the config ties
    them (as a real checkpoint does), so their memory and the floors' tied-head rule match it."""
    from hf_moe_opt.benchmarking.model import random_model, tiny_config

    config = tiny_config(name)
    model = random_model(name, torch.device("cpu"), config)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == bool(getattr(config, "tie_word_embeddings", False))
