"""The fused Triton router against the torch routers (CPU: triton's interpreter, see conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels import router as router_kernels  # noqa: E402
from hf_moe_opt.kernels.router import MAX_EXPERTS, MAX_TOKENS, fits, fused_router  # noqa: E402
from hf_moe_opt.routing import nllb_route, softmax_topk, switch_route  # noqa: E402
from hf_moe_opt.routing.switch import switch_keep  # noqa: E402

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


def _check_choices(
    ours: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, rel: float, min_exact: float = 0.9
) -> None:
    """Every token's chosen set equals the reference's, except where the experts that differ score
    within ``rel`` of the reference's k-th best (a tie at the arithmetic's precision); at least
    ``min_exact`` of the tokens exactly."""
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
    assert exact >= min_exact * ours.shape[0]


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
    if tokens == MAX_TOKENS and dtype != torch.bfloat16 and kernels_interpreted():
        pytest.skip("interpreted, the full-size case runs in bfloat16 only (9 s each); every dtype runs on a GPU")
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "hidden", "top_k"), [(1, 16, 64, 1), (9, 128, 40, 1), (5, 24, 32, 3)])
def test_topk_sigmoid_mode_matches_llama4_routing(dtype, tokens, experts, hidden, top_k):
    """Llama 4: top-k of the logits as stored, gate = sigmoid of the chosen logit in float32."""
    x, w, _ = _inputs(tokens, experts, hidden, dtype, bias=False, seed=top_k + tokens)
    logits, index, gates = fused_router(
        x, w, None, mode="topk_sigmoid", top_k=top_k, logits_dtype=dtype, gates_dtype=dtype
    )
    ref_logits = F.linear(x, w)
    ref_i, ref_g = _torch_router("topk_sigmoid", ref_logits, dtype, top_k, False, dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=tol, atol=tol)
    assert gates.dtype == dtype and index.shape == (tokens, top_k)
    # bf16 logits of 128 experts tie often: only near-ties may differ from torch's logits' choices.
    _check_choices(index.cpu(), ref_i.cpu(), logits.float().sigmoid().cpu(), rel=4 * tol, min_exact=0.5)
    # On the kernel's own logits: the same choices, descending, and the same gates.
    own_i, own_g = _torch_router("topk_sigmoid", logits, dtype, top_k, False, dtype)
    _check_choices(index.cpu(), own_i.cpu(), logits.float().sigmoid().cpu(), rel=0.0)
    chosen = logits.float().gather(1, index)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    # One rounding of the float32 sigmoid apart (the interpreter rounds 16-bit casts its own way).
    torch.testing.assert_close(gates, chosen.sigmoid().to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)
    same = (index == ref_i).all(dim=1)
    torch.testing.assert_close(gates[same], ref_g[same], rtol=4 * tol, atol=4 * tol)


def test_topk_sigmoid_takes_minus_infinity_logits():
    """Raw logits may be -inf (a sentinel can't mark taken experts): k distinct experts still come out."""
    x = torch.ones(2, 4, device=DEVICE)
    w = torch.tensor([[1.0] * 4, [-float("inf")] * 4, [-float("inf")] * 4, [2.0] * 4], device=DEVICE)
    logits, index, gates = fused_router(
        x, w, None, mode="topk_sigmoid", top_k=3, logits_dtype=torch.float32, gates_dtype=torch.float32
    )
    assert index.tolist() == [[3, 0, 1]] * 2
    torch.testing.assert_close(gates[:, 2], torch.zeros(2, device=DEVICE))


def test_all_tokens_on_one_expert():
    x, w, _ = _inputs(5, 16, 32, torch.float32, bias=False, seed=3)
    w[11] = x.mean(0) * 40  # expert 11 dominates every token
    _, index, gates = fused_router(
        x.abs(), w.abs(), None, mode="nllb", top_k=2, logits_dtype=torch.float32, gates_dtype=torch.float32
    )
    assert (index[:, 0] == 11).all()
    assert (gates[:, 0] > gates[:, 1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("tokens", [3, MAX_TOKENS + 9])
@pytest.mark.parametrize("mode", ["switch", "nllb", "softmax_topk", "topk_sigmoid"])
def test_non_finite_tokens_pick_experts_in_range(mode, tokens, bad):
    """A token with a NaN/inf feature (both launch paths): its experts are in range and distinct;
    Switch and NLLB pick what torch's argmax picks (NaN ranks first); the other tokens are untouched."""
    x, w, _ = _inputs(tokens, 12, 32, torch.float32, bias=False, seed=tokens)
    x[1, 5] = bad
    k = {"switch": 1, "nllb": 2}.get(mode, 2)
    top_k = k if mode in ("softmax_topk", "topk_sigmoid") else None
    kw = {"mode": mode, "top_k": top_k, "logits_dtype": torch.float32, "gates_dtype": torch.float32}
    _, index, gates = fused_router(x, w, None, **kw)
    assert ((index >= 0) & (index < 12)).all()
    assert len(set(index[1].tolist())) == k
    if mode != "topk_sigmoid" or bad != bad:  # sigmoid maps infinite logits to finite gates
        assert not torch.isfinite(gates[1]).all()
    ref_i, ref_g = _torch_router(mode, F.linear(x, w), x.dtype, top_k, False, torch.float32)
    if mode in ("switch", "nllb"):  # torch.topk's order among NaNs is unspecified
        assert torch.equal(index[1], ref_i[1])
    rest = torch.arange(tokens, device=DEVICE) != 1
    assert torch.equal(index[rest], ref_i[rest])
    torch.testing.assert_close(gates[rest], ref_g[rest])


def test_bad_arguments():
    x, w, _ = _inputs(2, 8, 16, torch.float32, bias=False, seed=0)
    kwargs = {"logits_dtype": torch.float32, "gates_dtype": torch.float32}
    with pytest.raises(ValueError, match="unknown router mode"):
        fused_router(x, w, None, mode="sigmoid", **kwargs)
    with pytest.raises(ValueError, match="routes to 2"):
        fused_router(x, w, None, mode="nllb", top_k=3, **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        fused_router(x, w[:, :8], None, mode="switch", **kwargs)
    many = torch.zeros(MAX_EXPERTS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="handles"):
        fused_router(x, many, None, mode="switch", **kwargs)
    assert fits(1, 8, 8) and not fits(1, 8, 9) and not fits(0, 8, 1) and not fits(1, 1, 1)
    assert fits(10**6, MAX_EXPERTS, 16) and not fits(10**6, MAX_EXPERTS + 1, 1)


# The one-launch kernel of batches above MAX_TOKENS.

# (x dtype, weight dtype): one 16-bit dtype (a 16-bit dot), float32 (tf32x3 on GPUs), bf16 tokens with
# a float32 weight of full-precision values (the weight split in three bf16 parts), fp16 tokens with
# a float32 weight (tf32x3).
LARGE_DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
# Tokens just above MAX_TOKENS and not multiples of a token block, hidden sizes not multiples of a
# hidden chunk; (top_k, normalize) of the softmax-top-k mode.
LARGE_SHAPES = [
    (65, 8, 64, True, 3, True),
    (130, 24, 100, False, 8, False),
    (333, 128, 96, True, 4, True),
    (97, 300, 40, False, 8, False),
]


def _large_inputs(tokens, experts, hidden, x_dtype, w_dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, x_dtype)
    # In float32 these are not bf16 values: all 24 bits of the weight matter.
    w = (torch.randn(experts, hidden, generator=g) / hidden**0.5).to(DEVICE, w_dtype)
    b = (torch.randn(experts, generator=g) * 0.1).to(DEVICE, w_dtype) if bias else None
    return x, w, b


def _torch_router(mode, logits, x_dtype, top_k, normalize, gates_dtype):
    """``(indices, gates)`` of the torch router of ``mode`` on ``logits`` ``[N, E]``."""
    if mode == "switch":
        ref = switch_route(logits[None], x_dtype, None)
        return ref.expert_index, ref.gates
    if mode == "nllb":
        ref = nllb_route(logits, x_dtype, capacity=None)
        return ref.expert_index, ref.gates
    if mode == "topk_sigmoid":
        values, indices = torch.topk(logits, top_k, dim=1)
        return indices, torch.sigmoid(values.float()).to(gates_dtype)
    weights, indices = softmax_topk(logits, top_k, normalize=normalize, weights_dtype=gates_dtype)
    return indices, weights


def _check_large(mode, x, w, b, top_k, normalize):
    """The kernel against the torch router of ``mode``: logits within their dtype's precision; on the
    kernel's own logits the torch router makes the same choices (near-ties aside) with the same gates;
    on torch's logits the same choices up to ties at the logits' precision."""
    tokens, experts = x.shape[0], w.shape[0]
    if mode == "softmax_topk":
        logits_dtype = torch.result_type(x, w)
        gates_dtype = torch.float32 if normalize else logits_dtype
    elif mode == "topk_sigmoid":
        logits_dtype = gates_dtype = torch.result_type(x, w)
        normalize = False
    else:
        logits_dtype, gates_dtype = torch.float32, x.dtype
        top_k, normalize = None, False
    logits, index, gates = fused_router(
        x, w, b, mode=mode, top_k=top_k, logits_dtype=logits_dtype, gates_dtype=gates_dtype, normalize=normalize
    )
    k = {"switch": 1, "nllb": 2}.get(mode, top_k)
    assert logits.dtype == logits_dtype and logits.shape == (tokens, experts)
    assert index.dtype == torch.int64 and index.shape == (tokens, k) and gates.dtype == gates_dtype
    assert ((index >= 0) & (index < experts)).all()
    # Torch's projection: the operands cast to the logits' dtype (router_logits / F.linear).
    cast = [None if t is None else t.to(logits_dtype) for t in (x, w, b)]
    ref_logits = F.linear(*cast)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[logits_dtype]
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)

    # What the choice ranks: probabilities, or for Llama 4 the logits (through the monotone sigmoid).
    probs = (logits.float().sigmoid() if mode == "topk_sigmoid" else torch.softmax(logits.float(), dim=-1)).cpu()
    mine_i, mine_g = _torch_router(mode, logits, x.dtype, top_k, normalize, gates_dtype)
    choice_rel = 2 * torch.finfo(x.dtype if mode in ("switch", "nllb") else torch.float32).eps
    _check_choices(index.cpu(), mine_i.cpu(), probs, rel=choice_rel)
    same = (index == mine_i).all(dim=1)
    torch.testing.assert_close(gates[same], mine_g[same])

    ref_i, _ = _torch_router(mode, ref_logits, x.dtype, top_k, normalize, gates_dtype)
    _check_choices(index.cpu(), ref_i.cpu(), probs, rel=max(choice_rel, 4 * tol))
    if mode == "nllb":
        assert (index[:, 0] != index[:, 1]).all()
    return logits, index, gates


@pytest.mark.parametrize("mode", ["switch", "nllb", "softmax_topk", "topk_sigmoid"])
@pytest.mark.parametrize(("x_dtype", "w_dtype"), LARGE_DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "hidden", "bias", "top_k", "normalize"), LARGE_SHAPES)
def test_large_batch_matches_torch_routers(mode, x_dtype, w_dtype, tokens, experts, hidden, bias, top_k, normalize):
    assert tokens > MAX_TOKENS
    x, w, b = _large_inputs(tokens, experts, hidden, x_dtype, w_dtype, bias, seed=tokens + experts)
    _check_large(mode, x, w, b, top_k, normalize)


@pytest.mark.parametrize(("block_t", "block_d"), [(16, 16), (64, 32), (128, 64)])
def test_large_batch_any_token_block(block_t, block_d, monkeypatch):
    """Partial token blocks and hidden chunks of every size the tile choice can make."""
    monkeypatch.setattr(
        router_kernels, "large_batch_config", lambda *_: router_kernels.LargeBatchConfig(block_t, block_d, 4)
    )
    x, w, b = _large_inputs(333, 24, 100, torch.bfloat16, torch.float32, True, seed=block_t)
    for mode in ("switch", "nllb", "softmax_topk", "topk_sigmoid"):
        _check_large(mode, x, w, b, 5, True)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), LARGE_DTYPES)
def test_large_batch_logits_have_fp32_accuracy(x_dtype, w_dtype):
    """Float32 logits at fp32 accuracy, whatever the operands' dtypes (the 16-bit dot, the exact
    three-part split of a float32 weight, tf32x3): against float64 logits, within twice torch's error
    or 2**-20 of the sum of the products' magnitudes (tensor cores accumulate fp32 sums without
    round-to-nearest; an H200 measured 2**-21.7 for the split against torch's 2**-24.3)."""
    x, w, b = _large_inputs(200, 16, 256, x_dtype, w_dtype, True, seed=5)
    logits, _, _ = fused_router(x, w, b, mode="switch", logits_dtype=torch.float32, gates_dtype=x_dtype)
    exact = F.linear(x.double(), w.double(), b.double())
    torch_error = (F.linear(x.float(), w.float(), b.float()).double() - exact).abs().max()
    scale = (x.double().abs() @ w.double().abs().T).max()
    error = (logits.double() - exact).abs().max()
    assert error <= max(2 * torch_error, 2**-20 * scale), f"{error:.3g} vs torch {torch_error:.3g}"


def test_large_batch_config_fits_the_tile():
    for experts in (2, 8, 24, 64, 128, 200, 256, 300, 512):
        block_e = max(16, 1 << (experts - 1).bit_length())
        for tokens in (65, 1000, 4096, 16384, 10**6):
            for operand_bytes, split in ((2, False), (4, False), (4, True)):
                config = router_kernels.large_batch_config(tokens, experts, 768, DEVICE, operand_bytes, split)
                assert 16 <= config.block_t <= 128 and config.block_t * block_e <= (16384 if split else 8192)
                chunk = config.block_d * max(block_e, config.block_t) * operand_bytes
                assert 16 <= config.block_d <= 64 and (chunk <= 16384 or config.block_d == 16)
                assert config.num_warps in (4, 8)
        most = router_kernels.large_batch_config(10**6, experts, 768, DEVICE).block_t
        assert most == max(16, min(128, 8192 // block_e))


def _force_fused(monkeypatch) -> list:
    """Route through the fused kernels here (CUDA; on CPU in the interpreter) and record each call's
    ``(mode, tokens)``."""
    from hf_moe_opt.routing import fused

    if DEVICE.type == "cpu":
        monkeypatch.setattr(fused, "DEVICE_TYPES", {"cuda", "cpu"})
        monkeypatch.setattr(fused, "_kernels", lambda: router_kernels)
    calls = []
    original = router_kernels.fused_router

    def counting(*args, **kwargs):
        calls.append((kwargs["mode"], args[0].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(router_kernels, "fused_router", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "seq"), [(2, 40), (2, 25)])
def test_switch_router_applies_a_binding_capacity_to_the_fused_choice(dtype, batch, seq, monkeypatch):
    """Sequences longer than the expert capacity: the fused kernels choose (one launch above
    MAX_TOKENS tokens, two below), the capacity queue drops tokens exactly as ``switch_route``."""
    from hf_moe_opt import optimize
    from hf_moe_opt.routing import router_logits
    from tests.models import tiny_switch

    calls = _force_fused(monkeypatch)
    model = tiny_switch(num_experts=8, expert_capacity=3).to(DEVICE, dtype)
    optimize(model, capacity="model")
    router = next(m for m in model.modules() if type(m).__name__ == "OptimizedSwitchRouter")
    g = torch.Generator().manual_seed(seq)
    hidden = torch.randn(batch, seq, model.config.d_model, generator=g).to(DEVICE, dtype)
    with torch.no_grad():
        routing = router(hidden)[0]
        ref = switch_route(router_logits(hidden, router.classifier, router.dtype), dtype, router.expert_capacity)
    assert calls == [("switch", batch * seq)]
    assert ref.keep is not None and not ref.keep.all()  # the capacity binds
    assert torch.equal(routing.expert_index, ref.expert_index)
    assert torch.equal(routing.keep, ref.keep)
    torch.testing.assert_close(routing.gates, ref.gates)
    assert switch_keep(routing.expert_index, batch, 8, None) is None
    assert switch_keep(routing.expert_index, batch, 8, seq) is None


def _model(family: str):
    from tests.models import VOCAB, tiny_nllb, tiny_switch
    from tests.test_families import tiny_model

    g = torch.Generator().manual_seed(4)
    if family in ("qwen3_moe", "llama4"):
        return tiny_model(family), {"input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    model = tiny_switch(num_experts=8) if family.startswith("switch") else tiny_nllb(num_experts=8)
    # "_long": 2 x 40 encoder tokens, above MAX_TOKENS (the one-launch kernel; Switch's capacity of 3 binds).
    ids = torch.randint(3, VOCAB, (2, 40 if family.endswith("_long") else 5), generator=g)
    return model, {"input_ids": ids, "decoder_input_ids": ids[:, :3]}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_a_nan_token_gives_nan_through_the_fused_router(tokens, backend, monkeypatch):
    """A NaN hidden state through the optimized Switch layer routed by the fused kernels (one token:
    the GEMV path): that token's output is NaN as the reference's, never stale memory or another
    expert's weights; the other tokens match the reference."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from hf_moe_opt.patches import SwitchTransformersPatch
    from tests.reference import switch_reference

    calls = _force_fused(monkeypatch)
    torch.manual_seed(tokens)
    cfg = SwitchTransformersConfig(d_model=16, d_ff=32, num_experts=6, expert_capacity=64, router_dtype="float32")
    block = SwitchTransformersSparseMLP(cfg).eval().to(DEVICE)
    x = torch.randn(1, tokens, 16, device=DEVICE)
    x[0, tokens // 2, 3] = float("nan")
    layer = SwitchTransformersPatch().build(block, cfg, capacity="model", backend=backend)
    with torch.no_grad():
        want = switch_reference(block, x, 64)
        got = layer(x)
    assert calls
    assert torch.isnan(want[0, tokens // 2]).all() and torch.isnan(got[0, tokens // 2]).all()
    rest = torch.arange(tokens, device=DEVICE) != tokens // 2
    torch.testing.assert_close(got[0, rest], want[0, rest])


@pytest.mark.parametrize("family", ["switch", "nllb", "qwen3_moe", "llama4", "switch_long", "nllb_long"])
def test_optimized_models_route_with_the_fused_router(family, monkeypatch):
    """The routers take the fused kernels (CUDA; on CPU forced, in the interpreter); the model's output
    matches the torch router's."""
    from hf_moe_opt import optimize

    model, inputs = _model(family)
    model = model.to(DEVICE, torch.bfloat16)
    optimize(model)
    calls = _force_fused(monkeypatch)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.no_grad():
        fast = model(**inputs).logits.float()
        assert calls, "no router took the fused kernels"
        if family.endswith("_long"):
            assert max(tokens for _, tokens in calls) > MAX_TOKENS
        monkeypatch.setenv("HF_MOE_OPT_FUSED_ROUTER", "0")
        calls.clear()
        slow = model(**inputs).logits.float()
        assert not calls
    torch.testing.assert_close(fast, slow, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_softmax_topk_router_refuses_mixed_dtypes_as_transformers_does(family, monkeypatch):
    """bf16 tokens into a float32 router weight: transformers' router raises (``F.linear``); the
    optimized one must too, on the fused path as on the torch one, instead of routing silently."""
    from hf_moe_opt import optimize
    from tests.test_families import tiny_model

    calls = _force_fused(monkeypatch)
    model = tiny_model(family).to(DEVICE)
    block = next(m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts"))
    router = block.gate
    x = torch.randn(5, model.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            router(x.bfloat16())  # transformers' own router
        optimize(model)
        with pytest.raises(RuntimeError):
            router(x.bfloat16())
        assert calls == []
        logits, weights, indices = router(x)  # same dtypes: the fused kernels route
    assert calls == [("softmax_topk", 5)] and indices.shape == (5, model.config.num_experts_per_tok)


@pytest.mark.parametrize("tokens", [3, 200])  # the two-launch path and the tiled one
def test_fused_switch_choice_ties_in_the_input_dtype_go_to_the_lower_expert(tokens):
    """Probabilities that differ in float32 but round to one bfloat16 value tie; the fused kernels
    choose the lower expert, as transformers' argmax over the bf16 probabilities does."""
    from hf_moe_opt.routing.switch import switch_choice

    hidden = 16
    column = torch.tensor([0.0, 1e-3, -6.0, -6.0])
    weight = torch.zeros(4, hidden)
    weight[:, 0] = column  # one-hot tokens: the logits are exactly ``column``
    x = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
    x[:, 0] = 1
    probs = torch.softmax(column, dim=-1)
    assert probs[1] > probs[0] and probs.bfloat16()[0] == probs.bfloat16()[1]
    logits, index, gates = router_kernels.fused_router(
        x.to(DEVICE), weight.to(DEVICE), None, mode="switch", logits_dtype=torch.float32, gates_dtype=torch.bfloat16
    )
    want_expert, want_gate = switch_choice(column.expand(tokens, 4), torch.bfloat16)
    assert torch.equal(index.cpu(), want_expert) and int(want_expert[0]) == 0
    assert torch.equal(gates.cpu(), want_gate)
