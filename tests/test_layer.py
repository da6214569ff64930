"""The dispatch + expert compute alone, against the per-token reference, over random shapes and routings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_moe_opt.dispatch import make_plan
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.experts.torch_backend import torch_moe_ffn

from .reference import moe_ffn_reference

ACTS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _case(n, e, k, d, f, dtype, bias, drop_p, skew, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    if skew == "one":
        idx = torch.zeros(n, k, dtype=torch.long)
        if k > 1:
            idx[:, 1:] = torch.randint(0, e, (n, k - 1), generator=g)
    else:
        idx = torch.randint(0, max(1, e // 2) if skew == "half" else e, (n, k), generator=g)
    gates = torch.rand(n, k, generator=g).to(dtype)
    keep = torch.rand(n, k, generator=g) >= drop_p
    w1 = (torch.randn(e, f, d, generator=g) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, f, generator=g) / f**0.5).to(dtype)
    b1 = torch.randn(e, f, generator=g).to(dtype) if bias else None
    b2 = torch.randn(e, d, generator=g).to(dtype) if bias else None
    return x, idx, gates, keep, w1, b1, w2, b2


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    e=st.integers(1, 9),
    k=st.integers(1, 3),
    d=st.integers(1, 24),
    f=st.integers(1, 24),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    drop_p=st.sampled_from([0.0, 0.3, 1.0]),
    skew=st.sampled_from(["uniform", "half", "one"]),
    act=st.sampled_from(sorted(ACTS)),
    out_scale=st.sampled_from([1.0, 0.8]),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_reference(n, e, k, d, f, dtype, bias, drop_p, skew, act, out_scale, seed):
    x, idx, gates, keep, w1, b1, w2, b2 = _case(n, e, k, d, f, dtype, bias, drop_p, skew, seed)
    plan = make_plan(idx, gates, keep, e)
    got = torch_moe_ffn(x, plan, w1, b1, w2, b2, Activation(act, ACTS[act]), out_scale)
    want = moe_ffn_reference(x, idx, gates, keep, w1, b1, w2, b2, ACTS[act], out_scale)
    assert got.dtype == x.dtype and got.shape == x.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), e=st.integers(1, 8), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_plan_is_a_stable_sort_by_expert_with_dropped_rows_last(n, e, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (n, k), generator=g)
    keep = torch.rand(n, k, generator=g) > 0.25
    gates = torch.rand(n, k, generator=g)
    plan = make_plan(idx, gates, keep, e)
    assert sorted(plan.order.tolist()) == list(range(n * k))
    flat_idx, flat_keep = idx.reshape(-1), keep.reshape(-1)
    expected = sorted(range(n * k), key=lambda a: (int(flat_idx[a]) if flat_keep[a] else e, a))
    assert plan.order.tolist() == expected
    counts = [int(((flat_idx == j) & flat_keep).sum()) for j in range(e)]
    assert plan.counts.tolist() == counts
    assert plan.offsets.tolist() == torch.tensor(counts).cumsum(0).tolist()
    assert plan.token.tolist() == [a // k for a in expected]
    kept = plan.kept_rows()
    assert kept.sum().item() == sum(counts)
    assert torch.equal(plan.gate[~kept], torch.zeros_like(plan.gate[~kept]))


def test_dropped_rows_never_leak_nan():
    # Rows past the last offset are left undefined by grouped GEMMs; they must be selected away.
    x = torch.randn(6, 8)
    idx = torch.tensor([[0], [1], [0], [1], [0], [1]])
    keep = torch.tensor([[True], [False], [True], [False], [False], [False]])
    w1 = torch.randn(2, 4, 8)
    w2 = torch.full((2, 8, 4), float("nan"))
    w2[0] = torch.randn(8, 4)
    plan = make_plan(idx, torch.ones(6, 1), keep, 2)
    out = torch_moe_ffn(x, plan, w1, None, w2, None, Activation("relu", torch.relu))
    assert torch.isfinite(out).all()
    assert torch.equal(out[[1, 3, 4, 5]], torch.zeros(4, 8))


@pytest.mark.parametrize("top_k", [1, 2])
def test_zero_tokens_give_an_empty_output(top_k: int) -> None:
    # An expert-parallel rank or an empty batch calls the experts with no tokens at all.
    e, d, f = 4, 8, 16
    plan = make_plan(torch.zeros(0, top_k, dtype=torch.long), torch.zeros(0, top_k), None, e)
    out = torch_moe_ffn(
        torch.zeros(0, d), plan, torch.randn(e, f, d), None, torch.randn(e, d, f), None, Activation("relu", torch.relu)
    )
    assert out.shape == (0, d)


def test_plan_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        make_plan(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1), torch.ones(3, 2, dtype=torch.bool), 4)


def test_grouped_mm_probe_inside_a_capture_is_not_cached_as_unsupported(monkeypatch):
    """The first call of a process may probe torch._grouped_mm inside a (stand-in) graph capture: the
    probe makes no host data there, so it gives the same answer as outside one."""
    from hf_moe_opt.experts import torch_backend
    from hf_moe_opt.host_sync import no_host_reads

    monkeypatch.setattr(torch_backend, "_GROUPED_MM_OK", {})
    outside = torch_backend.grouped_mm_supported(torch.device("cpu"), torch.float32, 16, 8)
    monkeypatch.setattr(torch_backend, "_GROUPED_MM_OK", {})
    with no_host_reads():
        inside = torch_backend.grouped_mm_supported(torch.device("cpu"), torch.float32, 16, 8)
    assert inside == outside and torch_backend._GROUPED_MM_OK == {("cpu", None, torch.float32, 16, 8, False): outside}
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm in this torch")
    assert outside


def test_layer_graphs_are_dropped_when_the_experts_are_stacked_again():
    """``cuda_graphs=True`` layer graphs read the stacked experts: re-pointed expert parameters gathered
    into a new stack (``sync_expert_copies``) drop them; an in-place write keeps them."""
    import hf_moe_opt

    from .models import tiny_switch

    model = hf_moe_opt.optimize(tiny_switch(num_experts=4), cuda_graphs=True)
    layer = hf_moe_opt.optimized_layers(model)[0][1]
    layer.graphs.graphs["captured"] = object()  # stands for a CUDA graph (none on a CPU)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(2)
    hf_moe_opt.sync_expert_copies(model)
    assert "captured" in layer.graphs.graphs
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.data = p.data * 2
    hf_moe_opt.sync_expert_copies(model)
    assert not layer.graphs.graphs


def test_dropped_rows_never_leak_into_input_gradients(monkeypatch):
    # torch._grouped_mm leaves rows past the last offset undefined, in its backward as in its forward:
    # stand-in that writes NaN there. A dropped token's gradient is exactly zero, every other is finite.
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm in this torch")
    real = torch._grouped_mm

    class UndefinedTail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            out = real(a, b, offs=offs)
            out[int(offs[-1]) :] = float("nan")
            return out

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            grad_a = real(grad, b.transpose(-2, -1), offs=offs)
            grad_a[int(offs[-1]) :] = float("nan")
            return grad_a, None, None

    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: UndefinedTail.apply(a, b, offs))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    idx = torch.tensor([[0], [1], [0], [1], [0], [1]])
    keep = torch.tensor([[True], [False], [True], [True], [False], [True]])
    w1, w2 = torch.randn(2, 16, 8, generator=g), torch.randn(2, 8, 16, generator=g)
    plan = make_plan(idx, torch.ones(6, 1), keep, 2)
    out = torch_moe_ffn(x, plan, w1, None, w2, None, Activation("relu", torch.relu))
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[[1, 4]], torch.zeros(2, 8))
    ref = x.detach().clone().requires_grad_(True)
    want = moe_ffn_reference(ref, idx, torch.ones(6, 1), keep, w1, None, w2, None, torch.relu)
    want.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-4, atol=1e-4)
