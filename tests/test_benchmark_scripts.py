"""Benchmark scripts that have a CPU smoke mode run end to end and report consistent numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_offloaded_tiny(tmp_path) -> None:
    out = tmp_path / "offload.json"
    assert _load("serve_offloaded").main(["--tiny", "--fraction", "0.25", "--new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cached_layers"] == 4  # 2 encoder + 2 decoder sparse layers
    # 8 experts per layer, 25% resident: 2 slots of 8.
    assert abs(result["resident_expert_gib"] / result["expert_gib"] - 0.25) < 1e-9
    assert 0.0 <= result["hit_rate"] < 1.0 and result["bytes_copied"] > 0
    assert result["ms_per_new_token"] > 0
