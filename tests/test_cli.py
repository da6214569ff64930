"""The command line: demo on the shipped models, profile -> plan, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from hf_moe_opt.cli import main
from hf_moe_opt.placement import PlacementPlan, RoutingTrace


def test_demo_table_plot_and_json(tmp_path, capsys, monkeypatch):
    # As users run it on a CPU: the fused RMSNorm falls back to the eager module, where under the tests'
    # TRITON_INTERPRET it would run interpreted (three quarters of this test's time; the kernel has its
    # own interpreted tests in test_dense.py).
    monkeypatch.setattr("hf_moe_opt.dense.rms_norm.kernels_interpreted", lambda: False)
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    # One timed run per variant: the test checks tokens, quality and the outputs, not the times.
    assert main(["demo", "--repeats", "1", "--plot", str(out_png), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "switch-tiny-ddtp" in printed and "nllb-moe-tiny-ddtp" in printed
    assert "indicative only" in printed  # CPU times are said to be rough
    rows = json.loads(out_json.read_text())["rows"]
    for model in {r["model"] for r in rows}:
        group = [r for r in rows if r["model"] == model]
        baseline = next(r for r in group if r["same_tokens"] == "baseline")
        for r in group:
            if r["variant"].startswith("hf_moe_opt"):
                # Every optimized variant reproduces the correct baseline: tokens and quality (the fused
                # dense parts to float32 rounding).
                assert r["same_tokens"] == "yes", r
                rel = 1e-5 if "fuse_dense" in r["variant"] else 1e-6
                assert r["quality"] == pytest.approx(baseline["quality"], rel=rel), r
    assert sum("fuse_dense" in r["variant"] for r in rows) == 2
    cache = [r for r in rows if "cache" in r["variant"]]
    assert cache and all(0 <= r["hit_rate"] <= 1 for r in cache)
    assert all(r["expert_mib"] < baseline["expert_mib"] for r in cache if r["model"] == baseline["model"])
    assert out_png.stat().st_size > 10_000


def test_profile_counts_no_padding_in_seq2seq_decoder_layers(tmp_path):
    """Texts of different lengths pad every batch; encoder and decoder layers both count each real
    token once (top-1), padding never."""
    from transformers import AutoTokenizer

    from hf_moe_opt.assets import shipped_model_path

    texts = ["Short one.", "A somewhat longer sentence about files and folders and tools.", "Mid length text here."]
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts))
    out = tmp_path / "trace.json"
    assert main(["profile", "--data", str(data), "--batches", "1", "--batch-size", "3", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(shipped_model_path("switch-tiny-ddtp"))
    real = int(tok(texts, padding=True, return_tensors="pt")["attention_mask"].sum())
    trace = json.loads(out.read_text())
    assert trace["metadata"]["top_k"] == 1
    sides = {layer["name"].split(".")[0] for layer in trace["layers"]}
    assert sides == {"encoder", "decoder"}
    for layer in trace["layers"]:
        assert sum(layer["counts"][0]) == real, layer["name"]


def test_profile_then_plan(tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"A small tool number {i} for managing files and folders." for i in range(32)))
    trace = tmp_path / "trace.json"
    assert main(["profile", "--data", str(data), "--batches", "2", "--batch-size", "8", "--out", str(trace)]) == 0
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(trace), "--devices", "2", "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["num_devices"] == 2 and plan["strategy"] == "greedy"
    assert "round_robin" in capsys.readouterr().out
    # 3 devices: greedy needs equal expert counts per device and cannot place 8 experts; round-robin
    # can, and the comparison says why greedy is missing instead of failing the command.
    rr_path = tmp_path / "rr.json"
    assert main(["plan", str(trace), "--devices", "3", "--strategy", "round_robin", "--out", str(rr_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(rr_path.read_text())["strategy"] == "round_robin"
    assert any(line.startswith("greedy") and "n/a" in line for line in out.splitlines())
    assert main(["plan", str(trace), "--devices", "3", "--strategy", "greedy", "--out", str(rr_path)]) == 2
    # One batch: no held-out half to compare on, but the chosen plan is still written.
    one = RoutingTrace.load(trace).select_batches([0])
    one_path = one.save(tmp_path / "one.json")
    capsys.readouterr()
    assert main(["plan", str(one_path), "--devices", "2", "--out", str(plan_path)]) == 0
    assert "one batch" in capsys.readouterr().out
    assert PlacementPlan.load(plan_path).num_devices == 2
    # --spare-slots: only for replicate, never negative; said at once instead of ignored.
    assert main(["plan", str(trace), "--spare-slots", "1", "--out", str(plan_path)]) == 2
    assert "applies to --strategy replicate" in capsys.readouterr().err
    assert main(["plan", str(trace), "--strategy", "replicate", "--spare-slots", "-3", "--out", str(plan_path)]) == 2
    assert ">= 0" in capsys.readouterr().err
    assert main(["plan", str(trace), "--strategy", "replicate", "--spare-slots", "2", "--out", str(plan_path)]) == 0
    assert PlacementPlan.load(plan_path).strategy == "replicate"


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "/nonexistent/trace.json"],
        ["demo", "--cache-fraction", "0"],
        ["demo", "--repeats", "0"],
        ["demo", "--device", "bogus"],
        ["profile", "--data", "README.md", "--out", "trace.bogus"],
        ["profile", "--data", "/nonexistent.txt"],
        ["demo", "--dtype", "int8"],
        ["profile", "--data", "README.md", "--max-length", "-3"],
        ["profile", "--data", "README.md", "--max-length", "0"],
        ["bench", "model", "--cpu-smoke", "--bogus"],
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, capsys):
    # In process (a subprocess each costs seconds of imports); the one below checks the real exit.
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (bad choices) exit from parse_args
        code = exit_.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]
    assert len(lines) == 1 and "error" in lines[0], lines


def test_bad_input_exits_2_from_the_command_line():
    argv = [sys.executable, "-m", "hf_moe_opt.cli", "demo", "--repeats", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Loading")]
    assert len(lines) == 1 and "error" in lines[0], proc.stderr


def test_profile_missing_hub_model_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = ["profile", "--data", "README.md", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "t.json")]
    proc = subprocess.run([sys.executable, "-m", "hf_moe_opt.cli", *argv], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Loading")]
    assert proc.returncode == 2 and len(lines) == 1 and "no-such-org/no-such-model" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--plot", "/nonexistent/folder/out.png", "does not exist"),
        ("--json", "/nonexistent/folder/out.json", "does not exist"),
        ("--plot", "{tmp}", "is a folder"),
        ("--json", "{tmp}", "is a folder"),
        ("--plot", "{tmp}/plot", "ending in one of .png"),
        ("--plot", "{tmp}/plot.xyz", "ending in one of .png"),
    ],
)
def test_demo_checks_outputs_before_running(monkeypatch, capsys, tmp_path, option, name, message):
    import hf_moe_opt.demo

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo ran although its output cannot be written")

    monkeypatch.setattr(hf_moe_opt.demo, "run_demo", must_not_run)
    assert main(["demo", option, name.format(tmp=tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_json_has_provenance(monkeypatch, tmp_path):
    import hf_moe_opt.demo

    monkeypatch.setattr(hf_moe_opt.demo, "run_demo", lambda *args: hf_moe_opt.demo.DemoResult())
    out = tmp_path / "demo.json"
    assert main(["demo", "--plot", "", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("hf-moe-opt demo") and report["repeats"] == 2
    assert report["backend"] == "auto" and report["cache_fraction"] == 0.5
    assert "torch" in report["versions"] and "cpu_count" in report["machine"]


def test_version_and_module_entry_point():
    import hf_moe_opt

    proc = subprocess.run([sys.executable, "-m", "hf_moe_opt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hf-moe-opt {hf_moe_opt.__version__}"
    argv = [sys.executable, "-m", "hf_moe_opt", "demo", "--repeats", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "error" in proc.stderr
