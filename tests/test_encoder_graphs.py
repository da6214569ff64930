"""``cuda_graphs="encoder"``: encoder forwards replayed per input signature (CPU: the eager stand-in)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from packaging.version import Version

pytest.importorskip("triton")

import hf_moe_opt  # noqa: E402
from hf_moe_opt import encoder_graphs  # noqa: E402
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.step_graphs import NLLB_MIN_TRANSFORMERS, EagerCapture  # noqa: E402

from .models import copied, tiny_nllb, tiny_switch  # noqa: E402

# The tests below run the eager stand-in on a CPU with the Triton kernels interpreted; the GPU test at
# the end captures real CUDA graphs.
cpu_interpreted = pytest.mark.skipif(not kernels_interpreted(), reason="needs TRITON_INTERPRET=1 (CPU)")


# The Triton kernels (triton's interpreter on a CPU) never read the host; the torch backend's expert
# loop does where torch._grouped_mm cannot take the weights' layout.
BACKEND = "triton"


def _graphed(model):
    hf_moe_opt.optimize(model, backend=BACKEND, cuda_graphs="encoder")
    runner = encoder_graphs.runner_of(model)
    runner.capture = EagerCapture(check_host_reads=True)  # replays refuse host reads, as a CUDA graph would
    return runner


def _ids(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, seq), generator=g)


@cpu_interpreted
@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_replays_equal_eager_and_generate_unchanged(make):
    model = make()
    plain = make()
    hf_moe_opt.optimize(plain, backend=BACKEND)
    installed = importlib.import_module("transformers").__version__
    if make is tiny_nllb and Version(installed) < Version(NLLB_MIN_TRANSFORMERS):
        with pytest.raises(ValueError, match="host data"):
            _graphed(model)
        return
    runner = _graphed(model)
    with torch.no_grad():
        for seed, (batch, seq) in enumerate([(2, 7), (2, 7), (3, 5), (2, 7)]):
            ids = _ids(batch, seq, seed)
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0
            out = model.get_encoder()(input_ids=ids, attention_mask=mask)
            ref = plain.get_encoder()(input_ids=ids, attention_mask=mask)
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
    assert runner.counts["captures"] == 2 and runner.counts["replays"] == 2, runner.counts
    ids = _ids(2, 7, 9)
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, plain.generate(ids, max_new_tokens=5, do_sample=False))
    assert runner.counts["captures"] == 3  # generate calls the encoder with arguments of its own
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), tokens)
    assert runner.counts["replays"] == 3  # the second generate replays its encoder pass


@cpu_interpreted
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_captures_its_own_graphs(how):
    # A graph replays its encoder's memory: a copy inheriting it would compute with the original's
    # weights. The copy starts without graphs, so new weights of the copy are used; the original keeps
    # replaying its own.
    model = tiny_switch()
    runner = _graphed(model)
    ids = _ids(2, 6, 0)
    with torch.no_grad():
        first = model.get_encoder()(input_ids=ids).last_hidden_state
        model.get_encoder()(input_ids=ids)  # captured and replayed
        clone = copied(model, how)
        copied_runner = encoder_graphs.runner_of(clone)
        assert copied_runner is not runner and copied_runner.encoder is clone.get_encoder() and not copied_runner.graphs
        for p in clone.parameters():
            p.mul_(0.9)
        encoder = clone.get_encoder()
        want = type(encoder).forward(encoder, input_ids=ids).last_hidden_state  # no runner in between
        for _ in range(2):  # captured, then replayed
            torch.testing.assert_close(encoder(input_ids=ids).last_hidden_state, want, rtol=0, atol=0)
        assert not torch.equal(want, first)
        assert torch.equal(model.get_encoder()(input_ids=ids).last_hidden_state, first)
    assert copied_runner.counts["captures"] == 1 and copied_runner.counts["replays"] == 1, copied_runner.counts
    assert runner.counts["replays"] == 2


@cpu_interpreted
def test_graphs_are_dropped_when_the_weights_move():
    """A graph reads the weights' memory: after a cast or re-pointed parameters the encoder captures
    again (a replay would read freed or stale memory on a GPU); an in-place write keeps the graphs."""
    model = tiny_switch()
    plain = tiny_switch()
    hf_moe_opt.optimize(plain, backend=BACKEND)
    runner = _graphed(model)
    ids = _ids(2, 6, 0)

    def check() -> None:
        with torch.no_grad():
            got = model.get_encoder()(input_ids=ids).last_hidden_state
            want = plain.get_encoder()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    check()
    check()
    assert runner.counts == {"captures": 1, "replays": 1, "eager": 0}
    for m in (model, plain):
        m.to(torch.bfloat16)
    check()
    assert runner.counts["captures"] == 2, runner.counts
    with torch.no_grad():
        for m in (model, plain):
            for p in m.parameters():
                p.data = p.data * 0.5
            hf_moe_opt.sync_expert_copies(m)
    check()
    assert runner.counts["captures"] == 3, runner.counts
    with torch.no_grad():
        for m in (model, plain):
            for p in m.parameters():
                p.mul_(0.5)
    check()
    assert runner.counts["captures"] == 3 and runner.counts["replays"] == 2, runner.counts


@cpu_interpreted
def test_positional_arguments_share_the_keyword_graph():
    model = tiny_switch()
    runner = _graphed(model)
    ids = _ids(2, 6, 0)
    with torch.no_grad():
        by_name = model.get_encoder()(input_ids=ids).last_hidden_state
        positional = model.get_encoder()(ids).last_hidden_state
    assert torch.equal(by_name, positional)
    assert runner.counts["captures"] == 1 and runner.counts["replays"] == 1


@cpu_interpreted
def test_outputs_are_the_callers_not_the_graphs():
    model = tiny_switch()
    _graphed(model)
    with torch.no_grad():
        a, b = _ids(2, 6, 0), _ids(2, 6, 1)
        first = model.get_encoder()(input_ids=a).last_hidden_state
        kept = first.clone()
        model.get_encoder()(input_ids=b)  # a replay writes the graph's buffers again
        second = model.get_encoder()(input_ids=a).last_hidden_state
    assert torch.equal(first, kept) and torch.equal(second, kept)


@cpu_interpreted
def test_eager_when_autograd_is_on_and_restore_detaches():
    model = tiny_switch()
    runner = _graphed(model)
    model.get_encoder()(input_ids=_ids(2, 5, 0))  # grad enabled
    assert runner.counts == {"captures": 0, "replays": 0, "eager": 1}
    assert any("autograd" in reason for reason in runner.eager_reasons)
    hf_moe_opt.restore(model)
    assert encoder_graphs.runner_of(model) is None
    assert "forward" not in model.get_encoder().__dict__


@cpu_interpreted
def test_graphs_are_bounded(monkeypatch):
    monkeypatch.setattr(encoder_graphs, "MAX_GRAPHS", 2)
    model = tiny_switch()
    runner = _graphed(model)
    with torch.no_grad():
        for seq in (3, 4, 5, 3):
            model.get_encoder()(input_ids=_ids(1, seq, seq))
    assert len(runner.graphs) == 2 and runner.counts["captures"] == 4  # 3 was dropped, then captured again


@cpu_interpreted
def test_host_read_falls_back_with_a_warning(monkeypatch):
    model = tiny_switch()
    runner = _graphed(model)
    encoder = model.get_encoder()
    original = type(encoder).forward

    def reading_forward(self, *args, **kwargs):
        if kwargs["input_ids"].sum().item() < 0:  # a host read
            raise AssertionError
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(encoder), "forward", reading_forward)
    ids = _ids(2, 5, 0)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="reads tensor values on the host"):
        out = encoder(input_ids=ids)
    with torch.no_grad():
        again = encoder(input_ids=ids)
    assert torch.equal(out.last_hidden_state, again.last_hidden_state)
    assert runner.counts["captures"] == 0 and runner.counts["eager"] == 2


def test_rejects_models_without_encoder_and_cached_experts():
    from .test_families import tiny_model

    causal = tiny_model("mixtral")
    with pytest.raises(ValueError, match="encoder"):
        hf_moe_opt.optimize(causal, cuda_graphs="encoder")
    assert not hf_moe_opt.is_optimized(causal)
    with pytest.raises(ValueError, match="resident experts"):
        hf_moe_opt.optimize(tiny_switch(), cuda_graphs="encoder", expert_cache=2)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_equal_eager(make, dtype):
    model, plain = make().cuda().to(dtype), make().cuda().to(dtype)
    hf_moe_opt.optimize(plain)
    installed = importlib.import_module("transformers").__version__
    if make is tiny_nllb and Version(installed) < Version(NLLB_MIN_TRANSFORMERS):
        with pytest.raises(ValueError, match="host data"):  # its encoder builds masks from Python data
            hf_moe_opt.optimize(model, cuda_graphs="encoder")
        assert not hf_moe_opt.is_optimized(model)
        return
    hf_moe_opt.optimize(model, cuda_graphs="encoder")
    runner = encoder_graphs.runner_of(model)
    with torch.no_grad():
        for seed in range(3):  # capture, then two replays with fresh inputs
            ids = _ids(3, 9, seed).cuda()
            mask = torch.ones_like(ids)
            mask[1, -3:] = 0
            out = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            ref = plain.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            assert torch.equal(out, ref)
        ids = _ids(2, 6, 7).cuda()
        for _ in range(2):
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                               plain.generate(ids, max_new_tokens=4, do_sample=False))  # fmt: skip
    assert runner.counts["captures"] == 2 and runner.counts["replays"] == 3, runner.counts


def test_nllb_needs_a_transformers_without_host_masks(monkeypatch):
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "5.17.0")
    model = tiny_nllb()
    with pytest.raises(ValueError, match="host data"):
        hf_moe_opt.optimize(model, cuda_graphs="encoder")
    assert not hf_moe_opt.is_optimized(model)


# -- encoder and step graphs together ------------------------------------------------------------


def _both(model):
    """``model`` optimized with encoder and step graphs, both on the eager stand-in."""
    from hf_moe_opt import step_graphs

    hf_moe_opt.optimize(model, backend=BACKEND, cuda_graphs=("encoder", "step"))
    encoder_runner = encoder_graphs.runner_of(model)
    encoder_runner.capture = EagerCapture(check_host_reads=True)
    step_runner = step_graphs.runner_of(model)
    step_runner.capture = EagerCapture()
    return encoder_runner, step_runner


@cpu_interpreted
def test_encoder_and_step_graphs_together_generate_plain_tokens():
    model, plain = tiny_switch(), tiny_switch()
    hf_moe_opt.optimize(plain, backend=BACKEND)
    encoder_runner, step_runner = _both(model)
    new = 5
    for seed in range(2):  # the second call replays the encoder pass and every decode step
        ids = _ids(2, 7, 9 + seed)
        kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kw), plain.generate(ids, **kw))
    assert encoder_runner.counts["captures"] == 1 and encoder_runner.counts["replays"] == 1, encoder_runner.counts
    # Two step graphs: the first decoder step (it fills the cross-attention cache) and the others.
    assert step_runner.counts["captures"] == 2 and step_runner.counts["fallbacks"] == 0, step_runner.counts
    assert step_runner.counts["replays"] == (new - 2) + new and step_runner.counts["eager"] == 0, step_runner.counts
    hf_moe_opt.restore(model)
    assert encoder_graphs.runner_of(model) is None and "generate" not in model.__dict__


@pytest.mark.parametrize(
    "modes, match",
    [
        ((True, "step"), "only 'encoder' and 'step'"),
        (("encoder", "layers"), "only 'encoder' and 'step'"),
        ("encoder+step", "unknown cuda_graphs"),
    ],
)
def test_graph_mode_combinations_are_checked(modes, match):
    model = tiny_switch()
    with pytest.raises(ValueError, match=match):
        hf_moe_opt.optimize(model, cuda_graphs=modes)
    assert not hf_moe_opt.is_optimized(model)
    with pytest.raises(ValueError, match="resident experts"):
        hf_moe_opt.optimize(model, cuda_graphs=["step", "encoder"], expert_cache=2)
    assert not hf_moe_opt.is_optimized(model)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_encoder_and_step_graphs_generate_plain_tokens(dtype):
    from hf_moe_opt import step_graphs

    model, plain = tiny_switch().cuda().to(dtype), tiny_switch().cuda().to(dtype)
    hf_moe_opt.optimize(plain)
    hf_moe_opt.optimize(model, cuda_graphs=("encoder", "step"))
    with torch.no_grad():
        for seed in range(3):
            ids = _ids(3, 9, seed).cuda()
            kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
            assert torch.equal(model.generate(ids, **kw), plain.generate(ids, **kw))
    encoder_counts, step_counts = encoder_graphs.runner_of(model).counts, step_graphs.runner_of(model).counts
    assert encoder_counts["captures"] == 1 and encoder_counts["replays"] == 2, encoder_counts
    assert step_counts["captures"] >= 1 and step_counts["replays"] > 0 and step_counts["fallbacks"] == 0, step_counts


@pytest.mark.parametrize("beams", [1, 2])
def test_bench_generate_cpu_smoke(tmp_path, beams):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generate.json"
    assert bench.main(["--cpu-smoke", "--batches", "2", "--num-beams", str(beams), "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["models"]
    assert rec["model"] == "switch-tiny" and rec["not_measured"] == {} and rec["num_beams"] == beams
    (row,) = rec["batches"]
    assert all(isinstance(row[f"{v}_ms"], float) for v in bench.VARIANTS)  # CPU timings are noise
    assert row["floor_ms"] > row["encoder_floor_ms"] > 0 and row["step_floor_ms"] > 0
    # The eager stand-ins replay the fused model's arithmetic: its tokens, bit for bit.
    assert row["step_tokens_equal_fused"] is True and row["encoder_step_tokens_equal_fused"] is True
    assert out.with_suffix(".png").exists()


def test_graphs_requested_off_cuda_say_so_once():
    """cuda_graphs="encoder" and cuda_graphs=True on a CPU model run eagerly and say so, once."""
    import warnings

    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    for mode, call in (
        ("encoder", lambda m: m.get_encoder()(input_ids=ids)),
        (True, lambda m: m(input_ids=ids, decoder_input_ids=ids[:, :2])),
    ):
        model = hf_moe_opt.optimize(tiny_switch(), cuda_graphs=mode)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            call(model)
            call(model)
        ours = [w for w in caught if "CUDA graphs need a CUDA device" in str(w.message)]
        layers = 1 if mode == "encoder" else len(hf_moe_opt.optimized_layers(model))
        assert len(ours) == layers, (mode, [str(w.message) for w in caught])  # once per runner, not per call


@cpu_interpreted
def test_graph_key_holds_the_input_dtype():
    """A tensor argument's dtype is part of a graph's signature: float64 embeddings into a float32 encoder
    fail (in the capture, and again eagerly) and mark only their own signature uncapturable; float32
    embeddings of the same shape then capture once and replay once."""
    model = tiny_switch()
    runner = _graphed(model)
    encoder = model.get_encoder()
    e64 = torch.randn(2, 5, model.config.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="cannot be captured"), pytest.raises(RuntimeError):
        encoder(inputs_embeds=e64)
    assert len(runner.uncapturable) == 1
    with torch.no_grad():
        first = encoder(inputs_embeds=e64.float()).last_hidden_state
        second = encoder(inputs_embeds=e64.float()).last_hidden_state
    assert torch.equal(first, second)
    assert runner.counts["captures"] == 1 and runner.counts["replays"] == 1, runner.counts
    assert "capture failed before for these inputs" not in runner.eager_reasons


@cpu_interpreted
def test_graphs_are_evicted_least_recently_used(monkeypatch):
    """With MAX_GRAPHS = 2 the least recently used graph goes, a replay counting as a use: lengths
    3, 4, 3, 5, 3 capture 3 and 4, replay 3 (3 is now the newest), capture 5 evicting 4, replay 3:
    3 captures, 2 replays (oldest-captured-first eviction would drop 3 and capture it a third time)."""
    monkeypatch.setattr(encoder_graphs, "MAX_GRAPHS", 2)
    model = tiny_switch()
    runner = _graphed(model)
    with torch.no_grad():
        for seq in (3, 4, 3, 5, 3):
            model.get_encoder()(input_ids=_ids(1, seq, seq))
    assert runner.counts == {"captures": 3, "replays": 2, "eager": 0}, runner.counts
    assert [key[1][0][1] for key in runner.graphs] == [(1, 5), (1, 3)]


@cpu_interpreted
def test_inputs_that_failed_to_capture_are_not_tried_again(monkeypatch):
    """A signature whose capture read the host is remembered: later calls with it run eagerly at once,
    without another capture attempt or warning. Three calls: the first runs the forward twice (the
    refused warm-up, then eagerly) and warns once, the next two once each: 4 forwards, 1 warning."""
    import warnings

    model = tiny_switch()
    runner = _graphed(model)
    encoder = model.get_encoder()
    original = type(encoder).forward
    runs = []

    def reading_forward(self, *args, **kwargs):
        runs.append(1)
        if kwargs["input_ids"].sum().item() < 0:  # a host read
            raise AssertionError
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(encoder), "forward", reading_forward)
    ids = _ids(2, 5, 0)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            encoder(input_ids=ids)
    ours = [w for w in caught if "reads tensor values on the host" in str(w.message)]
    assert len(ours) == 1 and len(runs) == 4
    assert runner.eager_reasons == {
        "the forward reads tensor values on the host": 1,
        "capture failed before for these inputs": 2,
    }, runner.eager_reasons
    assert runner.counts == {"captures": 0, "replays": 0, "eager": 3}, runner.counts
