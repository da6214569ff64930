"""The plan-free decode kernels (hf_moe_opt.kernels.gemv) against the torch reference over a plan."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

from hf_moe_opt.dispatch import make_plan  # noqa: E402
from hf_moe_opt.experts.activation import (  # noqa: E402
    Activation,
    act_limited_glu_activation,
    clamped_swiglu_activation,
    glu_activation,
    limited_swiglu_activation,
    softcapped_swiglu_activation,
)
from hf_moe_opt.experts.torch_backend import torch_moe_ffn  # noqa: E402
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels.gemv import fits, gemv_moe_ffn  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
ACTIVATIONS = {
    "relu": Activation("relu", torch.relu),
    "gelu": Activation("gelu", torch.nn.functional.gelu),
    "gelu_new": Activation("gelu_new", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    "silu": Activation("silu", torch.nn.functional.silu),
    "glu_silu": glu_activation("silu", torch.nn.functional.silu),
    "glu_gelu_interleaved": glu_activation("gelu", torch.nn.functional.gelu, interleaved=True),
    "clamped_swiglu": clamped_swiglu_activation(alpha=1.702, limit=0.8),
    "clamped_swiglu_halves": clamped_swiglu_activation(alpha=1.702, limit=0.8, interleaved=False),
    "limited_swiglu": limited_swiglu_activation(limit=0.8),
    "act_limited": act_limited_glu_activation("silu", torch.nn.functional.silu, limit=0.3),
    "softcapped_swiglu": softcapped_swiglu_activation(gate_cap=0.5, up_cap=0.7),
}


def _case(tokens, top_k, experts, hidden, ffn, dtype, bias, gated, seed, drop=0.0, one_expert=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    rows1 = 2 * ffn if gated else ffn
    w1, w2 = rnd(experts, rows1, hidden, scale=1 / math.sqrt(hidden)), rnd(experts, hidden, ffn, scale=ffn**-0.5)
    b1 = rnd(experts, rows1, scale=0.5) if bias else None
    b2 = rnd(experts, hidden, scale=0.5) if bias else None
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    if one_expert:
        index = torch.zeros(tokens, top_k, dtype=torch.long)
    else:
        index = torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices
    gates = torch.rand(tokens, top_k, generator=g)
    keep = (torch.rand(tokens, top_k, generator=g) >= drop) if drop else None
    to = {"device": DEVICE}
    return x, index.to(**to), gates.to(**to), None if keep is None else keep.to(**to), w1, b1, w2, b2


def _check(x, index, gates, keep, w1, b1, w2, b2, act, out_scale=1.0):
    plan = make_plan(index, gates, keep, w1.shape[0])
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, act, out_scale)
    out = gemv_moe_ffn(x, index, gates, keep, w1, b1, w2, b2, act, out_scale)
    assert out.shape == ref.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    atol, rtol = TOL[w1.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize(("dtype", "bias", "top_k"), [(torch.float32, True, 2), (torch.bfloat16, False, 1)])
def test_one_token_matches_reference(act, dtype, bias, top_k):
    gated = ACTIVATIONS[act].glu is not None
    case = _case(1, top_k, 6, 40, 72, dtype, bias, gated, seed=len(act) + top_k)
    _check(*case, ACTIVATIONS[act], out_scale=0.75)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_several_tokens_shared_experts_and_odd_shapes(dtype):
    # Not what the layer sends (it uses the plan path above one token), but the kernels take any count.
    case = _case(5, 3, 4, 33, 70, dtype, True, False, seed=5)
    _check(*case, ACTIVATIONS["gelu_new"], out_scale=0.5)
    _check(*_case(4, 2, 3, 17, 20, dtype, False, False, seed=6, one_expert=True), ACTIVATIONS["relu"])


def test_dropped_slots_contribute_zero():
    x, index, gates, _, w1, b1, w2, b2 = _case(6, 2, 5, 24, 40, torch.float32, True, False, seed=9)
    keep = torch.tensor([[True, False], [False, True], [False, False], [True, True], [False, False], [True, False]])
    out = _check(x, index, gates, keep.to(DEVICE), w1, b1, w2, b2, ACTIVATIONS["silu"])
    assert (out[~keep.any(dim=1).to(DEVICE)] == 0).all()
    everything = torch.zeros_like(keep)
    assert (gemv_moe_ffn(x, index, gates, everything.to(DEVICE), w1, b1, w2, b2, ACTIVATIONS["silu"]) == 0).all()


def test_transposed_fused_weights_and_mixed_dtypes():
    # transformers' fused [E, D, 2F] / [E, F, D] parameters through transposed views, fp32 tokens on bf16 experts.
    g = torch.Generator().manual_seed(12)
    experts, hidden, ffn = 4, 32, 48
    gate_up = (torch.randn(experts, hidden, 2 * ffn, generator=g) / hidden**0.5).to(DEVICE, torch.bfloat16)
    down = (torch.randn(experts, ffn, hidden, generator=g) / ffn**0.5).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, hidden, generator=g).to(DEVICE)
    index, gates = torch.tensor([[3, 1]], device=DEVICE), torch.rand(1, 2, generator=g).to(DEVICE)
    w1, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    out = _check(x, index, gates, None, w1, None, w2, None, ACTIVATIONS["glu_silu"])
    assert out.dtype == torch.float32


def test_wrong_expert_changes_the_result():
    x, index, gates, _, w1, b1, w2, b2 = _case(1, 1, 4, 16, 32, torch.float32, False, False, seed=14)
    out = gemv_moe_ffn(x, index, gates, None, w1, b1, w2, b2, ACTIVATIONS["relu"])
    other = gemv_moe_ffn(x, (index + 1) % 4, gates, None, w1, b1, w2, b2, ACTIVATIONS["relu"])
    assert not torch.allclose(out, other)


@pytest.mark.parametrize(("dtype", "drop"), [(torch.float32, 0.4), (torch.bfloat16, 0.0)])
def test_slot_map_reads_each_expert_from_its_slot(dtype, drop):
    # An expert cache's call: expert ids plus the slot table (dropped ids map to the out-of-range
    # slot S, which the keep mask never lets a kernel read); same result as the slots indexed first.
    tokens, top_k, experts, slots = 3, 2, 7, 4
    x, index, gates, keep, w1, b1, w2, b2 = _case(tokens, top_k, slots, 24, 40, dtype, True, False, seed=16, drop=drop)
    g = torch.Generator().manual_seed(17)
    resident = torch.randperm(experts, generator=g)[:slots]  # expert resident[s] sits in slot s
    table = torch.full((experts + 1,), slots, dtype=torch.long)
    table[resident] = torch.arange(slots)
    ids = resident.to(DEVICE)[index]  # expert ids whose slots are the case's indices
    if keep is not None:
        ids = torch.where(keep, ids, experts)
    act = ACTIVATIONS["gelu"]
    out = gemv_moe_ffn(x, ids, gates, keep, w1, b1, w2, b2, act, 0.5, slot_map=table.to(DEVICE))
    ref = _check(x, index, gates, keep, w1, b1, w2, b2, act, 0.5)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="slot_map"):
        gemv_moe_ffn(x, ids, gates, keep, w1, b1, w2, b2, act, slot_map=table.to(DEVICE).float())
    with pytest.raises(ValueError, match="slot_map"):
        gemv_moe_ffn(x, ids, gates, keep, w1, b1, w2, b2, act, slot_map=table.to(DEVICE)[None])


def _offsets_of(views, homes, where):
    """Element offsets of every expert from ``views[i][0]``: slot ``where[e]`` or, if None, ``homes[i][e]``."""
    tables = []
    for view, home in zip(views, homes, strict=True):
        if view is None:
            tables.append(None)
            continue
        size, base = view.element_size(), view.data_ptr()
        rows = [
            s * view.stride(0) if s is not None else (home[e].data_ptr() - base) // size for e, s in enumerate(where)
        ]
        tables.append(torch.tensor([*rows, 0], dtype=torch.int64, device=DEVICE))  # entry E: dropped, never read
    return tables


@pytest.mark.parametrize(("dtype", "drop", "bias"), [(torch.float32, 0.4, True), (torch.bfloat16, 0.0, False)])
def test_offsets_read_each_expert_from_its_slot_or_its_home(dtype, drop, bias):
    # A cache that reads misses where they live: some experts from slots, the rest from another
    # allocation (on a GPU, pinned host memory). Same result as all experts resident.
    from hf_moe_opt.kernels.gemv import ExpertOffsets

    tokens, top_k, experts, slots = 3, 2, 7, 3
    x, index, gates, keep, w1, b1, w2, b2 = _case(
        tokens, top_k, experts, 24, 40, dtype, bias, False, seed=18, drop=drop
    )
    homes = [None if t is None else t.cpu().pin_memory() if DEVICE.type == "cuda" else t.clone()
             for t in (w1, b1, w2, b2)]  # fmt: skip
    where: list[int | None] = [None] * experts
    slot_tensors = [torch.full((slots, *t.shape[1:]), float("nan"), dtype=dtype, device=DEVICE) if t is not None
                    else None for t in (w1, b1, w2, b2)]  # fmt: skip
    for s, e in enumerate([5, 0, 3]):  # these three sit in slots; the other four are read from home
        where[e] = s
        for slot, home in zip(slot_tensors, homes, strict=True):
            if slot is not None:
                slot[s].copy_(home[e])
    ids = index if keep is None else torch.where(keep, index, experts)
    act = ACTIVATIONS["relu"]
    w1o, b1o, w2o, b2o = _offsets_of(slot_tensors, homes, where)
    offsets = ExpertOffsets(
        w1o, b1o, w2o, b2o, aligned=all(int(v) % 8 == 0 for v in w1o) and all(int(v) % 8 == 0 for v in w2o)
    )
    sw1, sb1, sw2, sb2 = slot_tensors
    out = gemv_moe_ffn(x, ids, gates, keep, sw1, sb1, sw2, sb2, act, 0.5, offsets=offsets)
    ref = gemv_moe_ffn(x, index, gates, keep, w1, b1, w2, b2, act, 0.5)
    assert torch.equal(out, ref)  # the same kernels over the same numbers, only read elsewhere
    assert any(s is None for s in where) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not both"):
        gemv_moe_ffn(x, ids, gates, keep, sw1, sb1, sw2, sb2, act, slot_map=w1o, offsets=offsets)
    bad = ExpertOffsets(w1o.int(), b1o, w2o, b2o)
    with pytest.raises(ValueError, match="offsets.w1"):
        gemv_moe_ffn(x, ids, gates, keep, sw1, sb1, sw2, sb2, act, offsets=bad)
    missing = ExpertOffsets(w1o, None if bias else w1o, w2o, b2o)
    with pytest.raises(ValueError, match="offsets.b1"):
        gemv_moe_ffn(x, ids, gates, keep, sw1, sb1, sw2, sb2, act, offsets=missing)


def test_bad_inputs_raise():
    x, index, gates, _, w1, b1, w2, b2 = _case(2, 2, 4, 16, 32, torch.float32, False, False, seed=15)
    with pytest.raises(ValueError, match="same"):
        gemv_moe_ffn(x, index, gates[:, :1], None, w1, b1, w2, b2, ACTIVATIONS["relu"])
    with pytest.raises(ValueError, match="width"):
        gemv_moe_ffn(x[:, :8], index, gates, None, w1, b1, w2, b2, ACTIVATIONS["relu"])
    assert fits(1) and not fits(0)


def test_layer_decode_step_takes_the_plan_free_path(monkeypatch):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from hf_moe_opt.kernels import gemv
    from hf_moe_opt.patches import SwitchTransformersPatch

    cfg = SwitchTransformersConfig(d_model=32, d_ff=48, num_experts=4, expert_capacity=8, router_dtype="float32")
    torch.manual_seed(0)
    block = SwitchTransformersSparseMLP(cfg).to(DEVICE).eval()
    fast = SwitchTransformersPatch().build(block, cfg, capacity="model", backend="triton")
    slow = SwitchTransformersPatch().build(block, cfg, capacity="model", backend="torch")
    calls = []
    real = gemv.gemv_moe_ffn
    monkeypatch.setattr(gemv, "gemv_moe_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for tokens in (1, 3):
            x = torch.randn(1, tokens, 32, device=DEVICE)
            torch.testing.assert_close(fast(x), slow(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # one token only; three go through the plan


def test_strided_routing_views_read_their_own_values():
    """Column slices of wider routing tensors (row stride != top_k) give what their copies give."""
    x, _, _, _, w1, b1, w2, b2 = _case(5, 1, 4, 24, 40, torch.float32, True, False, seed=12)
    g = torch.Generator().manual_seed(13)
    index = torch.rand(5, 4, generator=g).argsort(1).to(DEVICE)[:, 1:2]
    gates = torch.rand(5, 3, generator=g).to(DEVICE)[:, :1]
    keep = torch.tensor([[True, False], [True, True], [False, True], [True, False], [True, True]]).to(DEVICE)[:, :1]
    assert not (index.is_contiguous() or gates.is_contiguous() or keep.is_contiguous())
    _check(x, index, gates, keep, w1, b1, w2, b2, ACTIVATIONS["relu"])
