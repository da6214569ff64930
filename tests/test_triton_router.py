"""The fused Triton router against the torch routers (CPU: triton's interpreter, see conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels.router import MAX_TOKENS, fits, fused_router  # noqa: E402
from hf_moe_opt.routing import nllb_route, softmax_topk, switch_route  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(tokens: int, experts: int, hidden: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    w = (torch.randn(experts, hidden, generator=g) / hidden**0.5).to(DEVICE, dtype)
    b = (torch.randn(experts, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    return x, w, b


def _check_choices(ours: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, rel: float) -> None:
    """Every token's chosen set equals the reference's, except where the experts that differ score
    within ``rel`` of the reference's k-th best (a tie at the arithmetic's precision); most are exact."""
    exact = 0
    for t in range(ours.shape[0]):
        mine, theirs = set(ours[t].tolist()), set(ref[t].tolist())
        assert len(mine) == ours.shape[1], f"token {t}: repeated experts {ours[t].tolist()}"
        if mine == theirs:
            exact += 1
            continue
        kth = scores[t, ref[t]].min()
        for e in mine ^ theirs:
            assert abs(scores[t, e] - kth) <= rel * kth.abs(), f"token {t}: chose {sorted(mine)} vs {sorted(theirs)}"
    assert exact >= 0.9 * ours.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "hidden", "bias"), [(1, 8, 32, False), (13, 24, 1100, True)])
def test_switch_mode_matches_switch_route(dtype, tokens, experts, hidden, bias):
    x, w, b = _inputs(tokens, experts, hidden, dtype, bias, seed=tokens)
    logits, index, gates = fused_router(x, w, b, mode="switch", logits_dtype=torch.float32, gates_dtype=dtype)
    ref_logits = F.linear(x.float(), w.float(), None if b is None else b.float())
    ref = switch_route(ref_logits.view(1, tokens, experts), dtype, None)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert index.shape == (tokens, 1) and index.dtype == torch.int64 and gates.dtype == dtype
    probs = torch.softmax(ref_logits, dim=-1)
    _check_choices(index.cpu(), ref.expert_index.cpu(), probs.cpu(), rel=2 * torch.finfo(dtype).eps)
    # The gate is the chosen expert's probability in the input dtype, whichever near-tie was taken.
    torch.testing.assert_close(gates, probs.to(dtype).gather(1, index), rtol=1e-2, atol=1e-5)
    same = index == ref.expert_index
    torch.testing.assert_close(gates[same], ref.gates[same])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "hidden"), [(1, 4, 16), (MAX_TOKENS, 128, 96), (9, 12, 48)])
def test_nllb_mode_matches_nllb_route(dtype, tokens, experts, hidden):
    x, w, b = _inputs(tokens, experts, hidden, dtype, bias=False, seed=experts)
    logits, index, gates = fused_router(x, w, b, mode="nllb", top_k=2, logits_dtype=torch.float32, gates_dtype=dtype)
    ref_logits = F.linear(x.float(), w.float())
    ref = nllb_route(ref_logits, dtype, capacity=None)
    assert ref.keep is None  # the no-drop case the kernel serves
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    probs = torch.softmax(ref_logits, dim=-1)
    _check_choices(index.cpu(), ref.expert_index.cpu(), probs.cpu(), rel=2 * torch.finfo(dtype).eps)
    assert (index[:, 0] != index[:, 1]).all()
    same = (index == ref.expert_index).all(dim=1)
    torch.testing.assert_close(gates[same], ref.gates[same])
    torch.testing.assert_close(gates.float().sum(dim=1), torch.ones(tokens, device=DEVICE), rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "experts", "hidden", "top_k", "normalize", "weights_fp32"),
    [(1, 8, 64, 2, True, True), (7, 60, 40, 4, False, False), (16, 128, 32, 8, True, False), (3, 6, 24, 6, True, True)],
)
def test_softmax_topk_mode_matches_softmax_topk(dtype, tokens, experts, hidden, top_k, normalize, weights_fp32):
    x, w, _ = _inputs(tokens, experts, hidden, dtype, bias=False, seed=top_k)
    weights_dtype = torch.float32 if weights_fp32 else dtype
    logits, index, gates = fused_router(
        x,
        w,
        None,
        mode="softmax_topk",
        top_k=top_k,
        logits_dtype=dtype,
        gates_dtype=weights_dtype,
        normalize=normalize,
    )
    ref_logits = F.linear(x, w)  # the family routers' projection, in the model dtype
    ref_w, ref_i = softmax_topk(ref_logits, top_k, normalize=normalize, weights_dtype=None if weights_fp32 else dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=tol, atol=tol)
    assert gates.dtype == weights_dtype and index.shape == (tokens, top_k)
    probs = torch.softmax(ref_logits.float(), dim=-1)
    _check_choices(index.cpu(), ref_i.cpu(), probs.cpu(), rel=4 * tol)
    # Descending, and the weights are the reference's for the chosen experts.
    chosen = probs.gather(1, index)
    assert (chosen[:, :-1] >= chosen[:, 1:] - 4 * tol).all()
    expect = chosen / chosen.sum(dim=1, keepdim=True) if normalize else chosen
    torch.testing.assert_close(gates.float(), expect.to(weights_dtype).float(), rtol=4 * tol, atol=4 * tol)
    same = (index == ref_i).all(dim=1)
    torch.testing.assert_close(gates[same], ref_w[same], rtol=4 * tol, atol=4 * tol)


def test_all_tokens_on_one_expert():
    x, w, _ = _inputs(5, 16, 32, torch.float32, bias=False, seed=3)
    w[11] = x.mean(0) * 40  # expert 11 dominates every token
    _, index, gates = fused_router(
        x.abs(), w.abs(), None, mode="nllb", top_k=2, logits_dtype=torch.float32, gates_dtype=torch.float32
    )
    assert (index[:, 0] == 11).all()
    assert (gates[:, 0] > gates[:, 1]).all()


def test_bad_arguments():
    x, w, _ = _inputs(2, 8, 16, torch.float32, bias=False, seed=0)
    kwargs = {"logits_dtype": torch.float32, "gates_dtype": torch.float32}
    with pytest.raises(ValueError, match="unknown router mode"):
        fused_router(x, w, None, mode="sigmoid", **kwargs)
    with pytest.raises(ValueError, match="routes to 2"):
        fused_router(x, w, None, mode="nllb", top_k=3, **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        fused_router(x, w[:, :8], None, mode="switch", **kwargs)
    big = torch.zeros(MAX_TOKENS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="handles"):
        fused_router(big, w, None, mode="switch", **kwargs)
    assert fits(1, 8, 8) and not fits(1, 8, 9) and not fits(0, 8, 1) and not fits(1, 1, 1)


def _model(family: str):
    from tests.models import VOCAB, tiny_nllb, tiny_switch
    from tests.test_families import tiny_model

    g = torch.Generator().manual_seed(4)
    if family == "qwen3_moe":
        return tiny_model(family), {"input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    model = tiny_switch(num_experts=8) if family == "switch" else tiny_nllb(num_experts=8)
    ids = torch.randint(3, VOCAB, (2, 5), generator=g)
    return model, {"input_ids": ids, "decoder_input_ids": ids[:, :3]}


@pytest.mark.parametrize("family", ["switch", "nllb", "qwen3_moe"])
def test_optimized_models_route_with_the_fused_router(family, monkeypatch):
    """Small batches take the fused router (CUDA; on CPU forced, in the interpreter); the model's
    output matches the torch router's."""
    from hf_moe_opt import optimize
    from hf_moe_opt.kernels import router as router_kernels
    from hf_moe_opt.routing import fused

    if DEVICE.type == "cpu":
        monkeypatch.setattr(fused, "DEVICE_TYPES", {"cuda", "cpu"})
        monkeypatch.setattr(fused, "_kernels", lambda: router_kernels)

    model, inputs = _model(family)
    model = model.to(DEVICE, torch.bfloat16)
    optimize(model)
    calls = []
    original = router_kernels.fused_router

    def counting(*args, **kwargs):
        calls.append(kwargs["mode"])
        return original(*args, **kwargs)

    monkeypatch.setattr(router_kernels, "fused_router", counting)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.no_grad():
        fast = model(**inputs).logits.float()
        assert calls, "no router took the fused kernels"
        monkeypatch.setenv("HF_MOE_OPT_FUSED_ROUTER", "0")
        calls.clear()
        slow = model(**inputs).logits.float()
        assert not calls
    torch.testing.assert_close(fast, slow, rtol=5e-2, atol=5e-2)
