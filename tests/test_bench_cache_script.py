"""benchmarks/bench_cache.py's CPU smoke mode runs every part and reports a consistent JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cache_smoke(tmp_path) -> None:
    out = tmp_path / "cache.json"
    assert _load("bench_cache").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["bandwidth"]["pinned_h2d_bytes_per_s"] is None
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
        assert row["tokens_equal_resident"] is True  # torch backend on the CPU: the cache changes nothing
        if row["fraction_resident"] < 1.0:
            assert 0.0 <= row["hit_rate"] <= 1.0 and 0.0 <= row["decoder_hit_rate"] <= 1.0
            assert row["bytes_copied"] >= 0 and row["slot_bytes"] > 0
            assert row["copy_vs_pinned_bandwidth"] is None  # no pinned bandwidth without CUDA
    # 25% of 8 experts is 2 slots: some step needs more than that, so something is copied.
    assert any(r["bytes_copied"] > 0 for r in rows if r["fraction_resident"] == 0.25)
    assert out.with_suffix(".png").exists()
