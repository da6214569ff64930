"""``cuda_graphs="encoder"``: encoder forwards replayed per input signature (CPU: the eager stand-in)."""

from __future__ import annotations

import importlib

import pytest
import torch
from packaging.version import Version

pytest.importorskip("triton")

import hf_moe_opt  # noqa: E402
from hf_moe_opt import encoder_graphs  # noqa: E402
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.step_graphs import NLLB_MIN_TRANSFORMERS, EagerCapture  # noqa: E402

from .models import tiny_nllb, tiny_switch  # noqa: E402

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
