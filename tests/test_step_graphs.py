"""Whole-step CUDA-graph decoding (``optimize(model, cuda_graphs="step")``).

On a CPU the runner's capture is swapped for :class:`EagerCapture`: the same static buffers, static
cache and per-signature replays, with transformers on its capture code paths and every host read of a
tensor value raising. GPU-marked tests capture real CUDA graphs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

import hf_moe_opt
from hf_moe_opt import step_graphs
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.host_sync import HostReadError, no_host_reads
from hf_moe_opt.step_graphs import CudaGraphCapture, EagerCapture, runner_of

from .models import VOCAB, tiny_nllb, tiny_switch
from .test_families import tiny_model

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
NEW = 8


def _build(family: str, seed: int = 0):
    return tiny_switch(num_experts=8, seed=seed) if family == "switch" else tiny_model(family, seed=seed)


def _inputs(model, batch: int = 3, seq: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    kw = {"input_ids": ids, "max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    mask = torch.ones_like(ids)
    if model.config.is_encoder_decoder:
        mask[0, -3:] = 0  # an encoder input padded on the right, as a tokenizer pads a batch
    else:
        mask[0, :3] = 0  # left padding on one row
    kw["attention_mask"] = mask
    return kw


def _pair(model, capture=None):
    """``(plain, stepped)``: ``model`` optimized as usual, and a copy optimized with step graphs."""
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain)
    hf_moe_opt.optimize(model, cuda_graphs="step")
    runner_of(model).capture = capture if capture is not None else EagerCapture()
    return plain, model


def _to(kw: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# -- host reads ---------------------------------------------------------------------------------


def test_host_read_detector():
    x = torch.randn(6)
    reads = [
        lambda: x.sum().item(),
        lambda: bool(x.max() > 0),
        lambda: x[x > 0],
        lambda: x.nonzero(),
        lambda: x.tolist(),
        lambda: torch.tensor([1, 2]),
        lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    ]
    for read in reads:
        with pytest.raises(HostReadError), no_host_reads():
            read()
    with no_host_reads():  # device-side work only
        torch.sort(x).indices[torch.arange(2)]
        torch.where(x > 0, x, 0).cumsum(0)
        torch.searchsorted(torch.sort(x).values, x)
    assert x.tolist()  # restored afterwards


@pytest.mark.parametrize("family", ["switch", "nllb", *CAUSAL, "llama4"])
def test_layer_forward_has_no_host_reads(family):
    """The optimized layer's forward reads nothing on the host, capacity drops and padding included."""
    if family == "nllb":
        model = tiny_nllb(num_experts=8, moe_eval_capacity_token_fraction=0.3)
    elif family == "switch":
        model = tiny_switch(num_experts=8, expert_capacity=2)
    else:
        model = tiny_model(family)
    hf_moe_opt.optimize(model, backend="torch")
    name, layer = hf_moe_opt.optimized_layers(model)[-1]
    x = torch.randn(3, 7, model.config.get_text_config().hidden_size if family in (*CAUSAL, "llama4") else 32)
    padding = torch.zeros(3, 1, 7, 7)
    padding[0, ..., :2] = torch.finfo(torch.float32).min
    with torch.no_grad():
        layer(x, padding) if family == "nllb" else layer(x)  # first call: backend probes may read the host
        with no_host_reads():
            layer(x, padding) if family == "nllb" else layer(x)


# -- generate through the runner, on a CPU -------------------------------------------------------


# Families whose static caches capture (full attention; others raise, below).
CAPTURED = ["glm4_moe", "flex_olmo", "phimoe", "hy_v3", "minicpm5_moe", "longcat_flash", "minimax_m3_vl"]


@pytest.mark.parametrize("family", ["switch", *CAUSAL, *CAPTURED])
def test_step_generate_matches_plain_generate(family):
    plain, model = _pair(_build(family))
    kw = _inputs(model)
    runner = runner_of(model)
    seq2seq = model.config.is_encoder_decoder
    with torch.no_grad():
        want = plain.generate(**kw)
        got = model.generate(**kw)
        assert torch.equal(got, want)
        # An encoder-decoder's first decoder step has a graph of its own; a causal prefill runs eagerly.
        graphs = 2 if seq2seq else 1
        assert runner.counts == {"captures": graphs, "replays": NEW - 2, "eager": 2 - graphs, "fallbacks": 0}
        again = model.generate(**kw)  # same cache and graphs, reset
    assert torch.equal(again, want)
    # The second call replays its first decode step too (and an encoder-decoder its first decoder step).
    assert runner.counts["captures"] == graphs and runner.counts["replays"] == (NEW - 2) + (NEW - 2 + graphs)


@pytest.mark.parametrize("name", ["switch-tiny-ddtp", "qwen3-moe-tiny-ddtp"])
def test_shipped_models_greedy_and_sampling(name):
    auto = AutoModelForSeq2SeqLM if name.startswith("switch") else AutoModelForCausalLM
    model = auto.from_pretrained(shipped_model_path(name)).eval()
    plain, model = _pair(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 2000, (4, 12), generator=g)
    kw = {"input_ids": ids, "max_new_tokens": 12, "min_new_tokens": 12}
    if not model.config.is_encoder_decoder:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        kw["attention_mask"] = mask
    with torch.no_grad():
        assert torch.equal(model.generate(**kw, do_sample=False), plain.generate(**kw, do_sample=False))
        sampled = {}
        for which, m in (("plain", plain), ("step", model)):
            torch.manual_seed(7)
            sampled[which] = m.generate(**kw, do_sample=True, top_k=20)
    assert torch.equal(sampled["step"], sampled["plain"])
    assert runner_of(model).counts["replays"] > 0


@pytest.mark.parametrize("family", ["switch", "qwen3_moe"])
def test_return_sequences_and_generation_config(family):
    plain, model = _pair(_build(family))
    ids = _inputs(model)["input_ids"][:2]
    sampled = []
    with torch.no_grad():
        for m in (plain, model):
            torch.manual_seed(0)
            sampled.append(m.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=3))
        config = GenerationConfig(
            max_length=9 + (0 if model.config.is_encoder_decoder else ids.shape[1]), do_sample=False
        )
        assert torch.equal(model.generate(ids, generation_config=config), plain.generate(ids, generation_config=config))
    assert torch.equal(*sampled) and sampled[0].shape[0] == 6
    assert config.cache_implementation is None and runner_of(model).counts["replays"] > 0  # config not modified
    assert {key[0] for key in runner_of(model).slots} == {6, 2}


@pytest.mark.parametrize("family", ["switch", "qwen3_moe", "nllb"])
def test_beam_search_matches_plain_beam_search(family):
    import transformers
    from packaging.version import Version

    from hf_moe_opt.step_graphs import NLLB_MIN_TRANSFORMERS

    if family == "nllb" and Version(transformers.__version__) < Version(NLLB_MIN_TRANSFORMERS):
        pytest.skip(f"NLLB-MoE step graphs need transformers >= {NLLB_MIN_TRANSFORMERS}")
    model = tiny_nllb(num_experts=8) if family == "nllb" else _build(family)
    plain, model = _pair(model)
    kw = {**_inputs(model, batch=2), "num_beams": 3, "num_return_sequences": 2}
    runner = runner_of(model)
    with torch.no_grad():
        want = plain.generate(**kw)
        got = model.generate(**kw)
        ((key, slot),) = runner.slots.items()
        tensors = [(layer.keys, layer.values) for layer in step_graphs._static_layers(slot.cache)]
        again = model.generate(**kw)
    assert torch.equal(got, want) and torch.equal(again, want) and got.shape[0] == 4
    assert key[0] == 6  # 2 prompts x 3 beams
    assert runner.counts["fallbacks"] == 0 and runner.counts["replays"] > 0, runner.counts
    # Reordered in place: the captured steps still see the cache tensors the graphs were built on.
    after = [(layer.keys, layer.values) for layer in step_graphs._static_layers(slot.cache)]
    assert all(k is k2 and v is v2 for (k, v), (k2, v2) in zip(tensors, after, strict=True))
    assert not any("reorder_cache" in layer.__dict__ for layer in step_graphs._static_layers(slot.cache))


class FrozenPythonCapture(EagerCapture):
    """The eager stand-in with one property of a real graph added: a replay leaves Python state as it
    was (here the cache's ``is_updated`` flags, which the first decoder step sets)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def capture(self, fn, device):
        replay = super().capture(fn, device)

        def frozen():
            (slot,) = self.runner.slots.values()
            flags = dict(slot.cache.is_updated)
            out = replay()
            slot.cache.is_updated.clear()
            slot.cache.is_updated.update(flags)
            return out

        return frozen


def test_first_decoder_step_graph_sets_the_cross_attention_flags():
    plain, model = _pair(_build("switch"))
    runner = runner_of(model)
    runner.capture = FrozenPythonCapture(runner)
    kw = _inputs(model)
    with torch.no_grad():
        want = plain.generate(**kw)
        for _ in range(2):  # captures both graphs, then replays both
            assert torch.equal(model.generate(**kw), want)
            (slot,) = runner.slots.values()
            # Only the runner can have set the flags: the replays changed no Python state.
            assert slot.cache.is_updated and all(slot.cache.is_updated.values())
    first_steps = [key for key in slot.graphs if not any(flag for _, flag in key[2])]
    assert len(first_steps) == 1 and len(slot.graphs) == 2
    assert runner.counts["replays"] == (NEW - 2) + NEW and runner.counts["eager"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_mask_is_built_outside_the_graph(dtype):
    """Switch's decoder turns the encoder padding mask into an additive mask at every step (transformers
    5.17 through a host-to-device copy); the runner passes that mask in, with the eager builder's values."""
    plain, model = _pair(_build("switch"))
    model.to(dtype)
    plain.to(dtype)
    kw = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    ((_, slot),) = runner_of(model).slots.items()
    padding, additive = slot._cross_masks
    assert padding is kw["attention_mask"] and additive.shape == (3, 1, 1, 10) and additive.dtype == dtype
    want = torch.where(padding.bool(), 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    assert torch.equal(additive, want)
    assert slot.cross_mask(additive, model) is additive  # a 4-D mask is used as given
    kw["attention_mask"][1, -5:] = 0  # the same tensor, edited in place between calls
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert torch.equal(slot._cross_masks[1][1, 0, 0, -5:], torch.full((5,), torch.finfo(dtype).min, dtype=dtype))


def test_every_step_runs_once():
    """Warm-up is the real first step and a capture runs nothing: one forward per new token."""
    plain, model = _pair(_build("qwen3_moe"))
    calls = {"plain": 0, "step": 0}
    plain.lm_head.register_forward_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("step", calls["step"] + 1))
    kw = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert calls["step"] == calls["plain"] == NEW


def test_host_read_in_a_step_is_caught():
    _, model = _pair(_build("switch"))
    layer = hf_moe_opt.optimized_layers(model)[-1][1]
    forward = layer.forward

    def reads_host(hidden_states, *args, **kwargs):
        if hidden_states.abs().sum() >= 0:  # a Python branch on a tensor value
            return forward(hidden_states, *args, **kwargs)
        raise AssertionError

    layer.forward = reads_host
    with pytest.raises(HostReadError), torch.no_grad():
        model.generate(**_inputs(model))


def test_slots_by_batch_and_length_bucket():
    plain, model = _pair(_build("switch"))
    runner = runner_of(model)
    with torch.no_grad():
        for batch, new in [(3, 8), (3, 20), (2, 8), (3, 8 + step_graphs.LENGTH_BUCKET)]:
            kw = {**_inputs(model, batch=batch), "max_new_tokens": new, "min_new_tokens": new}
            assert torch.equal(model.generate(**kw), plain.generate(**kw))
    # (3, 8) and (3, 20) share a length bucket; a new batch size and a longer call each add a cache
    # (with two graphs each: the first decoder step and the others).
    assert len(runner.slots) == 3 and runner.counts["captures"] == 2 * 3
    keys = list(runner.slots)
    with torch.no_grad():
        for batch in range(4, 4 + step_graphs.MAX_SLOTS):
            model.generate(**_inputs(model, batch=batch))
    assert len(runner.slots) == step_graphs.MAX_SLOTS and not set(keys) & set(runner.slots)  # LRU


def test_new_weights_drop_graphs():
    plain, model = _pair(_build("qwen3_moe"))
    runner = runner_of(model)
    kw = _inputs(model)
    with torch.no_grad():
        model.generate(**kw)
        for p in model.parameters():
            p.data = p.data.clone()  # same values, new memory: captured graphs would read the old
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert runner.counts["captures"] == 2 and len(runner.slots) == 1


def test_replaced_module_drops_graphs():
    plain, model = _pair(_build("qwen3_moe"))
    runner = runner_of(model)
    kw = _inputs(model)
    with torch.no_grad():
        model.generate(**kw)
        model.lm_head = copy.deepcopy(model.lm_head)  # same values, new parameters the graphs never saw
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert runner.counts["captures"] == 2 and len(runner.slots) == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_gets_its_own_runner(how):
    # A copy's steps run its own weights: it starts without the original's caches and graphs (which
    # replay the original's memory), captures its own, and leaves the original as it was.
    plain, model = _pair(_build("switch"))
    kw = _inputs(model)
    with torch.no_grad():
        before = model.generate(**kw)
        clone = copy.deepcopy(model) if how == "deepcopy" else _pickled(model)
        runner, runner_clone = runner_of(model), runner_of(clone)
        assert runner_clone is not runner and runner_clone.model is clone and not runner_clone.slots
        assert runner_clone.counts["captures"] == 0
        for model_ in (clone, plain):
            for p in model_.parameters():
                p.mul_(0.9)
        assert torch.equal(clone.generate(**kw), plain.generate(**kw))
        assert torch.equal(model.generate(**kw), before)
    assert runner_clone.counts["captures"] > 0 and runner_clone.counts["replays"] > 0


def _pickled(model):
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- fallbacks and errors -----------------------------------------------------------------------


def test_cpu_model_with_cuda_capture_falls_back_with_warning():
    plain, model = _pair(_build("switch"), capture=CudaGraphCapture())
    kw = _inputs(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="step graphs need CUDA"):
        got = model.generate(**kw)
    assert torch.equal(got, plain.generate(**kw))
    assert runner_of(model).counts == {"captures": 0, "replays": 0, "eager": 0, "fallbacks": 1}


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"cache_implementation": "dynamic"}, "not a static cache"),
        ({"use_cache": False}, "use_cache=False"),
    ],
)
def test_unsupported_generate_options_fall_back_with_warning(extra, match):
    plain, model = _pair(_build("qwen3_moe"))
    kw = {**_inputs(model), **extra}
    with torch.no_grad(), pytest.warns(UserWarning, match=match):
        got = model.generate(**kw)
    assert torch.equal(got, plain.generate(**kw))
    assert runner_of(model).counts["fallbacks"] == 1


def test_routing_observers_fall_back_with_warning():
    plain, model = _pair(_build("switch"))
    seen = []
    hf_moe_opt.optimized_layers(model)[-1][1].observers.append(lambda layer, routing: seen.append(routing))
    kw = _inputs(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="observers"):
        got = model.generate(**kw)
    assert torch.equal(got, plain.generate(**kw)) and len(seen) == NEW  # every step seen


def test_failed_capture_raises_then_falls_back():
    class Failing(EagerCapture):
        def capture(self, fn, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    plain, model = _pair(_build("qwen3_moe"), capture=Failing())
    kw = _inputs(model)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="capturing a decode step failed"):
            model.generate(**kw)
        with pytest.warns(UserWarning, match="capturing a decode step failed"):
            assert torch.equal(model.generate(**kw), plain.generate(**kw))


def test_nllb_moe_raises_on_old_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ValueError, match="cross-attention mask"):
        hf_moe_opt.optimize(tiny_nllb(), cuda_graphs="step")


@pytest.mark.parametrize("capacity_fraction", [0.3, 1.0])
def test_nllb_step_generate_matches_plain_generate(capacity_fraction):
    import transformers
    from packaging.version import Version

    from hf_moe_opt.step_graphs import NLLB_MIN_TRANSFORMERS

    if Version(transformers.__version__) < Version(NLLB_MIN_TRANSFORMERS):
        pytest.skip(f"NLLB-MoE step graphs need transformers >= {NLLB_MIN_TRANSFORMERS}")
    # Padded encoder rows and capacity drops in the encoder; the decoder's position table is grown
    # once on the host and looked up with the cache length as a device tensor.
    plain, model = _pair(tiny_nllb(num_experts=8, moe_eval_capacity_token_fraction=capacity_fraction))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    with torch.no_grad():
        want = plain.generate(**kw)
        assert torch.equal(model.generate(**kw), want)
        assert torch.equal(model.generate(**kw), want)
    counts = runner_of(model).counts
    # Two graphs (the first decoder step, which fills the cross-attention cache, and the others).
    assert counts["captures"] == 2 and counts["replays"] > 0 and counts["fallbacks"] == 0 and counts["eager"] == 0


@pytest.mark.parametrize(
    "family, layer",
    [
        ("gpt_oss", "StaticSlidingWindowLayer"),
        ("llama4", "StaticSlidingWindowLayer"),  # chunked attention
        ("cohere2_moe", "StaticSlidingWindowLayer"),
        ("afmoe", "StaticSlidingWindowLayer"),
        ("mimo_v2_flash", "StaticSlidingWindowLayer"),
        ("qwen3_next", "LinearAttentionLayer"),
        ("jamba", "LinearAttentionLayer"),  # its Mamba layers
        ("nemotron_h", "(DummyLayer|LinearAttentionLayer)"),  # its cache's layers for MoE / Mamba layers
        ("deepseek_v32", "StaticIndexedLayer"),
        ("hy_v4", "StaticIndexedLayer"),
        ("axk2", "StaticIndexedLayer"),
        ("kolibri1", "StaticSlidingWindowLayer"),
        ("kolibri1_1", "StaticSlidingWindowLayer"),
        ("laguna", "StaticSlidingWindowLayer"),
        ("flint", "StaticSlidingWindowLayer"),
        ("lara_mini", "LinearAttentionLayer"),
        ("inkling", "LinearAttentionAndStaticSlidingWindowAttentionLayer"),  # short convolutions
        ("beam", "StaticSlidingWindowLayer"),
        ("inkling2", "LinearAttentionAndStaticSlidingWindowAttentionLayer"),
        ("ergo", "StaticSlidingWindowLayer"),
    ],
)
def test_models_whose_cache_tracks_state_in_python_raise(family, layer):
    # Sliding windows (Llama 4's attention chunks too), linear-attention states, DeepSeek-V3.2's indexer cache.
    model = tiny_model(family)
    with pytest.raises(ValueError, match=f"cannot capture .*{layer}"):
        hf_moe_opt.optimize(model, cuda_graphs="step")
    assert not hf_moe_opt.is_optimized(model)


@pytest.mark.parametrize("option", [{"expert_cache": 2}, {"cuda_graphs": "steps"}, {"cuda_graphs": 2}])
def test_bad_options_raise(option):
    model = _build("switch")
    kw = {"cuda_graphs": "step", **option}
    with pytest.raises(ValueError, match="resident experts|unknown cuda_graphs"):
        hf_moe_opt.optimize(model, **kw)
    assert not hf_moe_opt.is_optimized(model)


def test_restore_detaches_generate():
    model = _build("switch")
    hf_moe_opt.optimize(model, cuda_graphs="step")
    assert runner_of(model) is not None and "generate" in model.__dict__
    hf_moe_opt.restore(model)
    assert runner_of(model) is None and "generate" not in model.__dict__
    hf_moe_opt.optimize(model, cuda_graphs=True)  # optimizable again, per-layer graphs this time
    assert runner_of(model) is None


# -- the benchmark's CPU smoke run ----------------------------------------------------------------


def test_bench_decode_graphs_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_decode_graphs", ROOT / "benchmarks" / "bench_decode_graphs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    assert bench.main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [m["model"] for m in result["models"]] == ["switch-tiny", "qwen3-tiny"]
    for rec in result["models"]:
        assert rec["step_graphs_unsupported"] is None and rec["step_graph_counts"]["replays"] > 0
        for row in rec["batches"]:
            assert all(isinstance(row[f"{v}_ms"], float) for v in bench.VARIANTS)  # CPU timings are noise
            assert row["floor_ms"] > 0 and row["step_tokens_equal_optimize"] is True
    assert out.with_suffix(".png").exists()


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("family", ["switch", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_cuda_step_graphs_replay_the_eager_static_path_exactly(family, backend):
    """bf16: real graphs give bit-identical logits to the same static-buffer path run eagerly."""
    model = _build(family).cuda().to(torch.bfloat16)
    if family == "deepseek_v3":
        # cuDNN's SDPA faults (misaligned address) on this tiny MLA config's head sizes in bf16,
        # in transformers' attention and without any hf_moe_opt layer involved.
        model.set_attn_implementation("eager")
    hf_moe_opt.optimize(model, backend=backend, cuda_graphs="step")
    runner = runner_of(model)
    kw = {**_to(_inputs(model), "cuda"), "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        runner.capture = EagerCapture(check_host_reads=False)
        want = model.generate(**kw)
        runner.capture = CudaGraphCapture()
        runner.clear()
        got = model.generate(**kw)
        again = model.generate(**kw)
    if model.config.is_encoder_decoder:  # two graphs per capture: the first decoder step and the others
        assert runner.counts["captures"] == 4 and runner.counts["replays"] == 2 * (NEW - 2) + NEW
    else:
        assert runner.counts["captures"] == 2 and runner.counts["replays"] == 2 * (NEW - 2) + (NEW - 1)
    for out in (got, again):
        assert torch.equal(out.sequences, want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, want.logits, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("family", ["switch", "qwen3_moe", "olmoe"])
def test_cuda_step_graphs_match_plain_generate(family, backend):
    """fp32 (no rounding noise to flip a routing choice): the tokens of plain optimized generate,
    whose dynamic cache runs attention over other lengths."""
    if "triton" not in hf_moe_opt.experts.available_backends():
        pytest.skip("triton backend not available")
    model = _build(family).cuda()
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain, backend=backend)
    hf_moe_opt.optimize(model, backend=backend, cuda_graphs="step")
    kw = _to(_inputs(model, batch=4), "cuda")
    with torch.no_grad():
        want = plain.generate(**kw)
        got = model.generate(**kw)
        got_again = model.generate(**kw)
    assert torch.equal(got, want) and torch.equal(got_again, want)
    graphs = 2 if model.config.is_encoder_decoder else 1  # an encoder-decoder's first decoder step has its own
    assert runner_of(model).counts["captures"] == graphs and runner_of(model).counts["fallbacks"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["switch", "qwen3_moe"])
def test_cuda_step_graphs_beam_search_matches_plain(family):
    """Real graphs: beam search's reordering must reach the tensors the captured steps read."""
    model = _build(family).cuda()
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain)
    hf_moe_opt.optimize(model, cuda_graphs="step")
    kw = {**_to(_inputs(model, batch=3), "cuda"), "num_beams": 4, "num_return_sequences": 2}
    with torch.no_grad():
        want = plain.generate(**kw)
        got = model.generate(**kw)
        got_again = model.generate(**kw)
    assert torch.equal(got, want) and torch.equal(got_again, want)
    counts = runner_of(model).counts
    assert counts["replays"] > 0 and counts["fallbacks"] == 0, counts


@pytest.mark.gpu
def test_cuda_shipped_switch_step_graphs():
    model = AutoModelForSeq2SeqLM.from_pretrained(shipped_model_path("switch-tiny-ddtp")).eval().cuda()
    plain, model = _pair(model, capture=CudaGraphCapture())
    ids = torch.randint(5, 2000, (8, 16), generator=torch.Generator().manual_seed(0)).cuda()
    kw = {"input_ids": ids, "max_new_tokens": 24, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert runner_of(model).counts["replays"] > 0


@pytest.mark.gpu
def test_cuda_fp32_torch_backend_falls_back():
    """fp32 experts on the torch backend loop over experts on the host: refused with a warning."""
    model = _build("switch").cuda()
    hf_moe_opt.optimize(model, backend="torch", cuda_graphs="step")
    if step_graphs._layer_host_read_reason(model, torch.device("cuda")) is None:
        pytest.skip("torch._grouped_mm runs float32 here")
    with torch.no_grad(), pytest.warns(UserWarning, match="grouped_mm"):
        model.generate(**_to(_inputs(model), "cuda"))


def test_a_positional_generation_config_sizes_the_cache_and_batch():
    """``generate(ids, config)``: the config passed positionally decides the cache length (past the
    first 64-position bucket) and the batch (beams), as it does by keyword."""
    from transformers import GenerationConfig

    plain, model = _pair(_build("qwen3_moe"))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for config in (
            GenerationConfig(max_new_tokens=70, do_sample=False, pad_token_id=0),
            GenerationConfig(max_new_tokens=5, num_beams=2, pad_token_id=0),
        ):
            assert torch.equal(model.generate(ids, config), plain.generate(ids, config))
    assert runner_of(model).counts["fallbacks"] == 0


def test_encoder_length_is_part_of_the_slot_key():
    """A slot's key holds the encoder length: the cross-attention cache is as long as the encoder output,
    so source lengths 10, 14, 10 (same batch and cache-length bucket) need two slots, the third call
    reusing the first. Each call gives plain generate's tokens with no fallback and no eager step.
    Counts: 6 new tokens are 6 decoder forwards; a new slot captures 2 (the first decoder step, then
    the others) and replays 4, a reused slot replays all 6: captures 2 + 2, replays 4 + 4 + 6."""
    plain, model = _pair(_build("switch"))
    runner = runner_of(model)
    with torch.no_grad():
        for seq in (10, 14, 10):
            kw = {**_inputs(model, batch=2, seq=seq), "max_new_tokens": 6, "min_new_tokens": 6}
            assert torch.equal(model.generate(**kw), plain.generate(**kw)), seq
    assert runner.broken is None
    assert sorted(key[:3] for key in runner.slots) == [(2, 64, 10), (2, 64, 14)]  # 1 + 6 positions: bucket 64
    assert runner.counts == {"captures": 4, "replays": 14, "eager": 0, "fallbacks": 0}, runner.counts


def test_slots_are_evicted_least_recently_used():
    """Slots are dropped least recently used first, a reused slot counting as used (MAX_SLOTS = 4).
    Batches 1, 2, 3, 4 fill four slots; 1 is reused (order 2, 3, 4, 1); 5 evicts 2 (3, 4, 1, 5); the last
    1 is still there. Five distinct slots made, two graphs each (the first decoder step and the next
    step of max_new_tokens=2): 10 captures. Evicting oldest-created first would drop 1 for 5 and capture
    it again (12)."""
    assert step_graphs.MAX_SLOTS == 4
    _, model = _pair(_build("switch"))
    runner = runner_of(model)
    with torch.no_grad():
        for batch in (1, 2, 3, 4, 1, 5, 1):
            model.generate(**{**_inputs(model, batch=batch, seq=6), "max_new_tokens": 2, "min_new_tokens": 2})
    assert [key[0] for key in runner.slots] == [3, 4, 5, 1]
    assert runner.counts["captures"] == 10 and runner.counts["replays"] == 2 * 2, runner.counts


def test_collection_paused_during_a_capture():
    # A collection inside a CUDA graph capture may free CUDA resources of unreachable objects, which
    # invalidates the capture: the collector is off while one runs, and back on afterwards.
    import gc

    from hf_moe_opt.graphs import collection_paused

    assert gc.isenabled()
    with collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), collection_paused():
        raise KeyError  # restored on errors too
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_dropped_step_graphs_are_freed_at_once():
    # A captured step holds CUDA memory: when the runner drops it, reference counting must free it
    # then, not a later cyclic collection (which could fall inside another capture and invalidate it).
    import gc
    import weakref

    from hf_moe_opt.step_graphs import _StepGraph

    plain, model = _pair(_build("switch"))
    kw = _inputs(model)
    gc.collect()
    with torch.no_grad():
        model.generate(**kw)
    refs = [weakref.ref(o) for o in gc.get_objects() if isinstance(o, _StepGraph)]
    assert refs and all(r() is not None for r in refs)
    enabled = gc.isenabled()
    gc.disable()
    try:
        runner_of(model).clear()
        assert all(r() is None for r in refs)
    finally:
        if enabled:
            gc.enable()


def test_refusal_says_why_each_cache_layer_cannot_be_replayed():
    from hf_moe_opt.step_graphs import _cache_layer_reasons

    assert "sliding-window" in _cache_layer_reasons("StaticSlidingWindowLayer")[0]
    assert len(_cache_layer_reasons("LinearAttentionAndStaticSlidingWindowAttentionLayer")) == 2
    assert "placeholder" in _cache_layer_reasons("DummyLayer")[0]
    assert "indexer" in _cache_layer_reasons("StaticIndexedLayer")[0]
    assert _cache_layer_reasons("SomethingNewLayer") == ["a cache layer the step runner does not know"]
