"""CUDA checks: bf16 exactness at real shapes, no host synchronisation, CUDA-graph capture."""

import copy
import warnings

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.dispatch import make_plan
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.experts.torch_backend import torch_moe_ffn

from .models import VOCAB, copied, tiny_nllb, tiny_switch, use_reference_blocks

pytestmark = pytest.mark.gpu
BACKENDS = ["torch", "triton"]


def _backend_or_skip(backend):
    if backend == "triton" and "triton" not in hf_moe_opt.experts.available_backends():
        pytest.skip("triton backend not available")
    return backend


def _real_layer(e=128, d=768, f=3072, k=1, n=4096, dtype=torch.bfloat16, bias=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g, dtype=dtype)
    idx = torch.randint(0, e, (n, k), device="cuda", generator=g)
    gates = torch.rand(n, k, device="cuda", generator=g, dtype=dtype)
    keep = torch.rand(n, k, device="cuda", generator=g) > 0.1
    w1 = torch.randn(e, f, d, device="cuda", generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(e, d, f, device="cuda", generator=g, dtype=dtype) / f**0.5
    b1 = torch.randn(e, f, device="cuda", generator=g, dtype=dtype) if bias else None
    b2 = torch.randn(e, d, device="cuda", generator=g, dtype=dtype) if bias else None
    return x, idx, gates, keep, w1, b1, w2, b2


def _loop_reference(x, idx, gates, keep, w1, b1, w2, b2):
    """Per-expert loop in float32: the semantics without any grouping trick."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        rows, slots = torch.where((idx == e) & keep)
        if rows.numel() == 0:
            continue
        h = x[rows].float() @ w1[e].float().T + (0 if b1 is None else b1[e].float())
        y = torch.relu(h) @ w2[e].float().T + (0 if b2 is None else b2[e].float())
        out.index_add_(0, rows, y * gates[rows, slots, None].float())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(128, 768, 3072, 1, 4096), (128, 2048, 8192, 2, 512), (8, 768, 3072, 1, 1)])
def test_real_shapes_bf16(backend, shape):
    from hf_moe_opt.experts import get_backend

    e, d, f, k, n = shape
    x, idx, gates, keep, w1, b1, w2, b2 = _real_layer(e, d, f, k, n, bias=k == 2)
    plan = make_plan(idx, gates, keep, e)
    got = get_backend(_backend_or_skip(backend))(x, plan, w1, b1, w2, b2, Activation("relu", torch.relu))
    want = _loop_reference(x, idx, gates, keep, w1, b1, w2, b2)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 2e-2, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_forward_has_no_host_sync(backend):
    model = tiny_nllb(num_experts=8, moe_eval_capacity_token_fraction=0.3).cuda().to(torch.bfloat16)
    hf_moe_opt.optimize(model, backend=_backend_or_skip(backend))
    layer = model.model.encoder.layers[0].ffn
    x = torch.randn(4, 16, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(4, 1, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x, mask)  # warm-up: backend probes may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["switch", "nllb"])
def test_layer_captures_in_a_cuda_graph(backend, family):
    model = (tiny_switch(num_experts=8) if family == "switch" else tiny_nllb(num_experts=8)).cuda().to(torch.bfloat16)
    hf_moe_opt.optimize(model, backend=_backend_or_skip(backend))
    layer = hf_moe_opt.optimized_layers(model)[0][1]
    static_x = torch.randn(2, 8, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        for seed in range(3):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.testing.assert_close(static_out, layer(static_x), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["switch", "nllb"])
def test_model_bf16_cuda_matches_reference(family):
    model = tiny_switch(expert_capacity=3) if family == "switch" else tiny_nllb(moe_eval_capacity_token_fraction=0.3)
    model = model.cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, VOCAB, (4, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    use_reference_blocks(ref, "model", {"encoder": mask == 0})
    hf_moe_opt.optimize(model)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits.float()
        o = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits.float()
        assert (o - r).abs().max() < 0.1 * r.abs().max()
        assert ref.generate(ids, **kw).shape == model.generate(ids, **kw).shape


def test_torch_backend_grouped_mm_used_for_bf16():
    from hf_moe_opt.experts.torch_backend import grouped_mm_supported

    assert grouped_mm_supported(torch.device("cuda"), torch.bfloat16, 768, 3072)
    x, idx, gates, keep, w1, b1, w2, b2 = _real_layer(n=64)
    plan = make_plan(idx, gates, keep, 128)
    out = torch_moe_ffn(x, plan, w1, b1, w2, b2, Activation("relu", torch.relu))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["switch", "nllb"])
def test_cuda_graphs_option_gives_identical_generation(backend, family):
    model = tiny_switch(num_experts=8) if family == "switch" else tiny_nllb(num_experts=8)
    model = model.cuda().to(torch.bfloat16)
    eager = copy.deepcopy(model)
    hf_moe_opt.optimize(eager, backend=_backend_or_skip(backend))
    hf_moe_opt.optimize(model, backend=backend, cuda_graphs=True)
    ids = torch.randint(3, VOCAB, (3, 10), device="cuda")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        got = model.generate(ids, **kw)
        got_again = model.generate(ids, **kw)  # replays the captured graphs
    assert torch.equal(got, want) and torch.equal(got_again, want)
    layers = hf_moe_opt.optimized_layers(model)
    assert sum(len(layer.graphs.graphs) for _, layer in layers) > 0


GENERATE = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)


def _captured_and_replayed(model) -> tuple[torch.Tensor, object]:
    """``(ids, first output)`` of two generate calls of a graphed model: everything captured is
    replayed once."""
    ids = torch.randint(3, VOCAB, (3, 10), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    before = model.generate(ids, **GENERATE)
    model.generate(ids, **GENERATE)
    return ids, before


def _same_generation(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("graphs", [True, ("encoder", "step")], ids=["layers", "encoder+step"])
def test_copies_of_graphed_models_capture_their_own(graphs, how):
    # Captured graphs replay the original model's memory. A copy (deepcopy, torch.save + load) starts
    # without them: after the copy's weights change, its tokens are a plain model's with those weights,
    # and the original still generates what it did.
    model = tiny_switch(num_experts=8).cuda().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain)
    hf_moe_opt.optimize(model, cuda_graphs=graphs)
    with torch.no_grad():
        ids, before = _captured_and_replayed(model)
        clone = copied(model, how)
        for model_ in (clone, plain):  # new weights everywhere (experts included), other tokens
            for param in model_.parameters():
                param.mul_(0.75)
            model_.lm_head.weight.mul_(-1.0)
        want = plain.generate(ids, **GENERATE)
        for _ in range(2):  # captured, then replayed
            _same_generation(clone.generate(ids, **GENERATE), want)
        assert not torch.equal(want.sequences, before.sequences)
        again = model.generate(ids, **GENERATE)
    assert torch.equal(again.sequences, before.sequences)
    torch.testing.assert_close(torch.stack(again.scores), torch.stack(before.scores), rtol=0, atol=0)


@pytest.mark.parametrize("change", ["load_state_dict", "cast", "re-point"])
@pytest.mark.parametrize("graphs", [True, ("encoder", "step")], ids=["layers", "encoder+step"])
def test_graphed_models_follow_weight_changes(graphs, change, monkeypatch):
    # New weights after graphs were captured: loaded in place (the unfused torch router reads a float32
    # copy of its weight, brought up to date before a replay), a cast (graphs dropped), re-pointed
    # parameters gathered again (graphs dropped). Tokens and scores are a fresh model's with those weights.
    monkeypatch.setenv("HF_MOE_OPT_FUSED_ROUTER", "0")
    model = tiny_switch(num_experts=8).cuda().to(torch.bfloat16)
    other = tiny_switch(num_experts=8, seed=5).cuda().to(torch.bfloat16)
    other.lm_head.weight.data.mul_(-1.0)
    hf_moe_opt.optimize(model, cuda_graphs=graphs)
    with torch.no_grad():
        ids, before = _captured_and_replayed(model)
        if change == "load_state_dict":
            model.load_state_dict(other.state_dict())
        elif change == "cast":  # then loaded in place (float16 overflows in these random models: float32)
            model.float()
            other.float()
            model.load_state_dict(other.state_dict())
        else:
            for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
                mine.data = theirs.data.clone()
            hf_moe_opt.sync_expert_copies(model)
        plain = hf_moe_opt.optimize(copy.deepcopy(other))
        want = plain.generate(ids, **GENERATE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # captured or replayed, then replayed
                _same_generation(model.generate(ids, **GENERATE), want)
    assert not torch.equal(want.sequences, before.sequences)
    assert not [w for w in caught if "cannot be captured" in str(w.message)]  # captured again, not eager


def test_restore_after_moving_an_expert_cached_model():
    # Optimized on the GPU with an expert cache, then moved to the CPU: restore() leaves the experts
    # where the model now is, and the restored model is the plain one.
    base = tiny_switch(num_experts=8).cuda()
    model = hf_moe_opt.optimize(copy.deepcopy(base), expert_cache=2)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids.cuda(), decoder_input_ids=ids.cuda())
        model.to("cpu")
        model(input_ids=ids, decoder_input_ids=ids)
        hf_moe_opt.restore(model)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        got = model(input_ids=ids, decoder_input_ids=ids).logits
        want = base.cpu()(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_cache_generate_and_torch_compile(backend):
    """transformers may torch.compile a static-cache decode step; the layers run between its graphs."""
    base = tiny_switch(num_experts=8).cuda()
    model = hf_moe_opt.optimize(copy.deepcopy(base).to(torch.bfloat16), backend=_backend_or_skip(backend))
    ids = torch.randint(3, VOCAB, (2, 10), device="cuda")
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        got = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want)
    # Compiled in float32 (in bfloat16 inductor's fused dense kernels round differently, a few ulps).
    model32 = hf_moe_opt.optimize(base, backend=backend)
    with torch.no_grad():
        logits = model32(input_ids=ids, decoder_input_ids=ids).logits
        compiled = torch.compile(model32)(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(compiled, logits, rtol=1e-4, atol=1e-4)
