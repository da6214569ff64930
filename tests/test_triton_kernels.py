"""The Triton expert kernels against the torch reference (CPU: triton's interpreter, see conftest)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")
# The interpreter evaluates exp() of large negative inputs in numpy (sigmoid); inf is the right answer.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

from hf_moe_opt.dispatch import DispatchPlan, make_plan  # noqa: E402
from hf_moe_opt.experts.activation import (  # noqa: E402
    Activation,
    act_limited_glu_activation,
    clamped_swiglu_activation,
    glu_activation,
    limited_swiglu_activation,
    softcapped_swiglu_activation,
)
from hf_moe_opt.experts.torch_backend import torch_moe_ffn  # noqa: E402
from hf_moe_opt.kernels import (  # noqa: E402
    KernelConfig,
    get_configs,
    kernel_supported,
    kernels_interpreted,
    moe_ffn,
    moe_ffn_with_configs,
)
from hf_moe_opt.kernels.launch_config import clear_cache, device_file_stem, shape_key  # noqa: E402

from .reference import moe_ffn_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "relu": Activation("relu", torch.relu),
    "gelu": Activation("gelu", torch.nn.functional.gelu),
    "gelu_new": Activation("gelu_new", _gelu_tanh),
    "gelu_pytorch_tanh": Activation("gelu_pytorch_tanh", _gelu_tanh),
    "silu": Activation("silu", torch.nn.functional.silu),
    "relu2": Activation("relu2", lambda x: torch.relu(x).square()),  # Nemotron-H's experts
}
# Small tiles so the tiny test shapes still span several M/N tiles and K iterations (the interpreter's
# cost grows with the number of programs, so not the smallest tiles everywhere).
SMALL = KernelConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
TINY = KernelConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _weights(num_experts: int, hidden: int, ffn: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    w1 = rnd(num_experts, ffn, hidden, scale=1 / math.sqrt(hidden))
    w2 = rnd(num_experts, hidden, ffn, scale=1 / math.sqrt(ffn))
    b1 = rnd(num_experts, ffn, scale=0.5) if bias else None
    b2 = rnd(num_experts, hidden, scale=0.5) if bias else None
    return w1, b1, w2, b2


def _plan(
    expert_index: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None, seed: int = 0
) -> DispatchPlan:
    g = torch.Generator().manual_seed(seed + 1)
    gates = torch.rand(expert_index.shape, generator=g)
    if keep is None:
        keep = torch.ones(expert_index.shape, dtype=torch.bool)
    return make_plan(expert_index.to(DEVICE), gates.to(DEVICE), keep.to(DEVICE), num_experts)


def _random_index(num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Distinct experts per token, like a real top-k router.
    return torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices


def _check(x, plan, w1, b1, w2, b2, act, out_scale=1.0, config=SMALL):
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, act, out_scale)
    if config is None:
        out = moe_ffn(x, plan, w1, b1, w2, b2, act, out_scale)
    else:
        out = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, act, out_scale, config, config)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    atol, rtol = TOL[w1.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations(act: str, dtype: torch.dtype) -> None:
    num_tokens, top_k, num_experts, hidden, ffn = 23, 2, 4, 24, 40
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=4), num_experts)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias=True, seed=5)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS[act], out_scale=0.75)


@pytest.mark.parametrize(
    ("top_k", "bias", "dtype"),
    [(k, b, d) for k in (1, 2) for b in (False, True) for d in (torch.float32, torch.bfloat16)]
    + [(2, True, torch.float16)],
)
def test_random_routing_with_drops(top_k: int, bias: bool, dtype: torch.dtype) -> None:
    # 37 tokens: group sizes are not multiples of BLOCK_M; D and F are not multiples of BLOCK_N/K.
    num_tokens, num_experts, hidden, ffn = 37, 6, 40, 72
    g = torch.Generator().manual_seed(7)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    index = _random_index(num_tokens, top_k, num_experts, seed=8)
    keep = torch.rand(num_tokens, top_k, generator=g) > 0.25
    gates = torch.rand(num_tokens, top_k, generator=g)
    plan = make_plan(index.to(DEVICE), gates.to(DEVICE), keep.to(DEVICE), num_experts)
    assert not bool(plan.kept_rows().all())
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias, seed=9)
    out = _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu_new"], out_scale=0.5)
    # Also against the per-token loop (not only the torch backend, which shares the plan with us).
    args = (index.to(DEVICE), gates.to(DEVICE), keep.to(DEVICE), w1, b1, w2, b2, ACTIVATIONS["gelu_new"].fn)
    ref = moe_ffn_reference(x, *args, out_scale=0.5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # Tokens with every assignment dropped get exact zeros (residual only).
    all_dropped = ~keep.any(dim=1)
    assert all_dropped.any()
    assert (out[all_dropped.to(DEVICE)] == 0).all()


def test_empty_experts_and_one_hot_expert() -> None:
    num_tokens, num_experts, hidden, ffn = 33, 8, 20, 36
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=12)
    # Every token on the last expert: experts 0..6 are empty, one group spans three tiles.
    plan = _plan(torch.full((num_tokens, 1), num_experts - 1), num_experts)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["relu"], config=TINY)
    # Only experts 2 and 5 used, top-2.
    index = torch.stack([torch.full((num_tokens,), 5), torch.full((num_tokens,), 2)], dim=1)
    index[::3] = index[::3].flip(1)
    _check(x, _plan(index, num_experts), w1, b1, w2, b2, ACTIVATIONS["silu"], out_scale=2.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_single_token(top_k: int) -> None:
    num_experts, hidden, ffn = 4, 24, 48
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=14)
    plan = _plan(_random_index(1, top_k, num_experts, seed=15), num_experts)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"])
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], config=None)


def test_everything_dropped() -> None:
    num_tokens, top_k, num_experts, hidden, ffn = 5, 2, 3, 16, 32
    x = torch.randn(num_tokens, hidden).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=16)
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=17), num_experts, keep)
    out = _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["relu"])
    assert (out == 0).all()


def test_single_expert_and_no_tokens() -> None:
    num_tokens, hidden, ffn = 20, 16, 32
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(27)).to(DEVICE)
    w1, b1, w2, b2 = _weights(1, hidden, ffn, torch.float32, bias=True, seed=28)
    plan = _plan(torch.zeros(num_tokens, 1, dtype=torch.long), 1)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"])
    empty = _plan(torch.zeros(0, 1, dtype=torch.long), 1)
    out = moe_ffn(x[:0], empty, w1, b1, w2, b2, ACTIVATIONS["gelu"])
    assert out.shape == (0, hidden)


def test_default_configs_and_mixed_dtypes() -> None:
    # Default config path (table lookup) with x in fp32 and bf16 experts, large tiles over a tiny shape.
    num_tokens, top_k, num_experts, hidden, ffn = 29, 2, 5, 48, 80
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=19), num_experts)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.bfloat16, bias=True, seed=20)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu_pytorch_tanh"], config=None)


def test_non_contiguous_inputs() -> None:
    num_tokens, top_k, num_experts, hidden, ffn = 19, 2, 3, 24, 40
    g = torch.Generator().manual_seed(21)
    x = torch.randn(hidden, num_tokens, generator=g).to(DEVICE).t()
    w1 = (torch.randn(num_experts, hidden, ffn, generator=g) / math.sqrt(hidden)).to(DEVICE).transpose(1, 2)
    w2 = (torch.randn(num_experts, ffn, hidden, generator=g) / math.sqrt(ffn)).to(DEVICE).transpose(1, 2)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=22), num_experts)
    _check(x, plan, w1, None, w2, None, ACTIVATIONS["silu"])


def test_unsupported_activation_falls_back() -> None:
    act = Activation("quick_gelu", lambda t: t * torch.sigmoid(1.702 * t))
    assert not kernel_supported(torch.zeros(1, 4, device=DEVICE), torch.zeros(1), torch.zeros(1), act)
    num_tokens, num_experts, hidden, ffn = 9, 3, 16, 32
    x = torch.randn(num_tokens, hidden).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=23)
    plan = _plan(_random_index(num_tokens, 1, num_experts, seed=24), num_experts)
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, act)
    torch.testing.assert_close(moe_ffn(x, plan, w1, b1, w2, b2, act), ref)


GATED = {
    "glu_silu": glu_activation("silu", torch.nn.functional.silu),
    "glu_gelu_interleaved": glu_activation("gelu", torch.nn.functional.gelu, interleaved=True),
    "clamped_swiglu": clamped_swiglu_activation(alpha=1.702, limit=0.8),
    "clamped_swiglu_halves": clamped_swiglu_activation(alpha=1.702, limit=0.8, interleaved=False),
    "limited_swiglu": limited_swiglu_activation(limit=0.8),
    "act_limited": act_limited_glu_activation("silu", torch.nn.functional.silu, limit=0.3),
    "softcapped_swiglu": softcapped_swiglu_activation(gate_cap=0.5, up_cap=0.7),
}


@pytest.mark.parametrize("act", list(GATED))
@pytest.mark.parametrize(("dtype", "bias", "top_k"), [(torch.float32, True, 2), (torch.bfloat16, False, 3)])
def test_gated_experts(act: str, dtype: torch.dtype, bias: bool, top_k: int) -> None:
    # W1 holds the gate and up projections fused ([E, 2F, D]); h has F columns.
    num_tokens, num_experts, hidden, ffn = 27, 5, 24, 40
    g = torch.Generator().manual_seed(50)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    w1, b1, _, _ = _weights(num_experts, hidden, 2 * ffn, dtype, bias, seed=51)
    _, _, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias, seed=52)
    keep = torch.rand(num_tokens, top_k, generator=g) > 0.2
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=53), num_experts, keep)
    activation = GATED[act]
    assert kernel_supported(x, w1, w2, activation)
    out = _check(x, plan, w1, b1, w2, b2, activation, out_scale=0.5)
    # The layout matters: reading the halves the wrong way round must change the result.
    other = Activation(
        activation.name, activation.fn, glu="interleaved" if activation.glu == "concatenated" else "concatenated"
    )
    if activation.glu in ("concatenated", "interleaved"):
        wrong = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, other, 0.5, SMALL, SMALL)
        assert not torch.allclose(wrong.float(), out.float(), atol=1e-2)


def test_gated_transposed_weights_default_configs() -> None:
    # transformers' fused [E, D, 2F] parameters, used through a transposed view (no copy).
    num_tokens, top_k, num_experts, hidden, ffn = 21, 2, 4, 32, 48
    g = torch.Generator().manual_seed(60)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, torch.bfloat16)
    gate_up = (torch.randn(num_experts, hidden, 2 * ffn, generator=g) / math.sqrt(hidden)).to(DEVICE, torch.bfloat16)
    down = (torch.randn(num_experts, ffn, hidden, generator=g) / math.sqrt(ffn)).to(DEVICE, torch.bfloat16)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=61), num_experts)
    _check(x, plan, gate_up.transpose(1, 2), None, down.transpose(1, 2), None, GATED["glu_silu"], config=None)


def test_custom_glu_falls_back() -> None:
    act = Activation("glu_custom", torch.relu, glu="custom", gate_fn=lambda h: h[:, ::2] * h[:, 1::2])
    w1, w2 = torch.zeros(2, 8, 4, device=DEVICE), torch.zeros(2, 4, 4, device=DEVICE)
    assert not kernel_supported(torch.zeros(1, 4, device=DEVICE), w1, w2, act)


def test_many_row_tiles_per_expert() -> None:
    # 150 rows on each of two experts: ten 16-row tiles each, more than one GROUP_M swizzle group.
    num_tokens, num_experts, hidden, ffn = 300, 4, 16, 48
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(70)).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=71)
    index = torch.where(torch.arange(num_tokens) % 2 == 0, 1, 3)[:, None]
    _check(x, _plan(index, num_experts), w1, b1, w2, b2, ACTIVATIONS["relu"], config=TINY)


@pytest.mark.parametrize(
    ("hidden", "ffn", "split_k", "act"),
    [(32, 48, 1, "glu_silu"), (32, 64, 2, "relu"), (24, 40, 1, "gelu")],
    ids=["glu-even-k", "split-k", "partial-k"],
)
def test_unmasked_row_loads(hidden: int, ffn: int, split_k: int, act: str) -> None:
    # Groups of ~4+ row tiles: full K tiles load rows without a mask (rows past a group read other
    # rows, never stored), also with dropped assignments, a gated W1 and split-K partials.
    from hf_moe_opt.kernels.moe_ffn import _mask_rows

    num_tokens, top_k, num_experts = 75, 2, 2
    assert not _mask_rows(num_tokens * top_k, num_experts, TINY.block_m)
    g = torch.Generator().manual_seed(80)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE)
    activation = GATED[act] if act in GATED else ACTIVATIONS[act]
    w1, b1, _, _ = _weights(num_experts, hidden, ffn * (2 if act in GATED else 1), torch.float32, True, seed=81)
    _, _, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, True, seed=82)
    keep = torch.rand(num_tokens, top_k, generator=g) > 0.1
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=83), num_experts, keep)
    config = KernelConfig(block_m=16, block_n=16, block_k=16, split_k=split_k)
    _check(x, plan, w1, b1, w2, b2, activation, config=config)


def test_kernel_detects_wrong_weights() -> None:
    # The comparison must be able to fail: a swapped expert is caught.
    num_tokens, num_experts, hidden, ffn = 17, 3, 16, 32
    x = torch.randn(num_tokens, hidden).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=False, seed=25)
    plan = _plan(_random_index(num_tokens, 1, num_experts, seed=26), num_experts)
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, ACTIVATIONS["relu"])
    out = moe_ffn_with_configs(x, plan, w1.flip(0), b1, w2, b2, ACTIVATIONS["relu"], 1.0, SMALL, SMALL)
    assert not torch.allclose(out, ref, atol=1e-3)


def test_mismatched_shapes_are_refused() -> None:
    """The kernels take their sizes from the weights: tokens, weights, biases and the plan's expert
    count must agree, or they would read out of bounds (or compute wrong numbers) silently."""
    from hf_moe_opt.kernels.gemv import gemv_moe_ffn

    num_tokens, num_experts, hidden, ffn = 6, 4, 16, 8
    x = torch.randn(num_tokens, hidden).to(DEVICE)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, torch.float32, bias=True, seed=3)
    index = _random_index(num_tokens, 1, num_experts, seed=4)
    plan = _plan(index, num_experts)
    relu = ACTIVATIONS["relu"]
    gates = torch.ones(num_tokens, 1, device=DEVICE)
    for args, match in (
        ((x[:, : hidden // 2], plan, w1, b1, w2, b2, relu), "tokens"),
        ((x, plan, w1[:, : ffn // 2], b1, w2, b2, relu), "do not make"),
        ((x, plan, w1, b1[:, :1], w2, b2, relu), "b1"),
        ((x, _plan(index, num_experts + 4), w1, b1, w2, b2, relu), "routes to 8 experts"),
        ((x, plan, w1, b1, w2, b2, glu_activation("silu", torch.nn.functional.silu)), "gated"),
    ):
        with pytest.raises(ValueError, match=match):
            moe_ffn_with_configs(*args, 1.0, SMALL, SMALL)
    with pytest.raises(ValueError, match="b2"):
        gemv_moe_ffn(x[:1], index[:1], gates[:1], None, w1, b1, w2, b2[:, :2], relu)


def test_config_lookup(tmp_path, monkeypatch) -> None:
    gemm1, gemm2 = get_configs(torch.device("cpu"), 128, 768, 3072, 1, 1)
    assert isinstance(gemm1, KernelConfig) and isinstance(gemm2, KernelConfig)
    with pytest.raises(ValueError):
        KernelConfig(block_m=24, block_n=16, block_k=16)
    # A directory named by the environment variable overrides the shipped default table.
    import json

    key = shape_key(4, 8, 16, 2)
    table = {
        "default": [
            {"tokens": 1, "gemm1": SMALL.to_dict(), "gemm2": SMALL.to_dict()},
            {"tokens": 262144, "gemm1": TINY.to_dict(), "gemm2": TINY.to_dict()},
        ],
        "shapes": {
            key: [
                {"tokens": 8, "gemm1": SMALL.to_dict(), "gemm2": SMALL.to_dict()},
                {"tokens": 1024, "gemm1": KernelConfig(64, 64, 32).to_dict(), "gemm2": SMALL.to_dict()},
            ]
        },
    }
    (tmp_path / f"{device_file_stem('default')}.json").write_text(json.dumps(table))
    monkeypatch.setenv("HF_MOE_OPT_TRITON_CONFIGS", str(tmp_path))
    clear_cache()
    try:
        assert get_configs(torch.device("cpu"), 4, 8, 16, 2, 10)[0] == SMALL
        assert get_configs(torch.device("cpu"), 4, 8, 16, 2, 500)[0] == KernelConfig(64, 64, 32)
        assert get_configs(torch.device("cpu"), 5, 8, 16, 2, 500)[0] == SMALL
        # Far from every entry of the shape (1024 is 10x from 100): the default list is not nearer.
        assert get_configs(torch.device("cpu"), 4, 8, 16, 2, 100)[0] == KernelConfig(64, 64, 32)
        # 131072 tokens: the shape's 1024 entry is 128x away, the default's 262144 entry 2x.
        assert get_configs(torch.device("cpu"), 4, 8, 16, 2, 131072)[0] == TINY
    finally:
        monkeypatch.delenv("HF_MOE_OPT_TRITON_CONFIGS")
        clear_cache()


@pytest.mark.gpu
def test_real_shape_gpu() -> None:
    num_tokens, top_k, num_experts, hidden, ffn = 4096, 1, 128, 768, 3072
    dtype = torch.bfloat16
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(30)).to(DEVICE, dtype)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=31), num_experts)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias=False, seed=32)
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, ACTIVATIONS["relu"])
    out = moe_ffn(x, plan, w1, b1, w2, b2, ACTIVATIONS["relu"])
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    # top-2 with drops at the same shape.
    keep = torch.rand(num_tokens, 2, generator=torch.Generator().manual_seed(33)) > 0.1
    plan = _plan(_random_index(num_tokens, 2, num_experts, seed=34), num_experts, keep)
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu_new"], 0.5)
    out = moe_ffn(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu_new"], 0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [1, 2])
def test_cuda_graph_capture(top_k: int) -> None:
    num_tokens, num_experts, hidden, ffn = 64, 16, 256, 512
    dtype = torch.bfloat16
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias=True, seed=40)
    act = ACTIVATIONS["gelu"]
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    index = _random_index(num_tokens, top_k, num_experts, seed=41).to(DEVICE)
    gates = torch.rand(num_tokens, top_k, device=DEVICE)
    keep = torch.ones(num_tokens, top_k, dtype=torch.bool, device=DEVICE)

    def step() -> torch.Tensor:
        return moe_ffn(x, make_plan(index, gates, keep, num_experts), w1, b1, w2, b2, act)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    # New routing and inputs, copied into the captured buffers, must change the replayed result.
    for seed in (42, 43):
        x.copy_(torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype))
        index.copy_(_random_index(num_tokens, top_k, num_experts, seed=seed).to(DEVICE))
        gates.copy_(torch.rand(num_tokens, top_k, device=DEVICE))
        keep.copy_(torch.rand(num_tokens, top_k, device=DEVICE) > 0.2)
        graph.replay()
        torch.cuda.synchronize()
        ref = torch_moe_ffn(x, make_plan(index, gates, keep, num_experts), w1, b1, w2, b2, act)
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "drops"),
    [(1, 1, 8, False), (1, 2, 4, True), (13, 2, 5, True), (64, 2, 128, False), (37, 3, 7, True), (20, 1, 1, False)],
)
def test_fused_plan_equals_make_plan(num_tokens: int, top_k: int, num_experts: int, drops: bool) -> None:
    from hf_moe_opt.kernels.plan import fused_plan

    g = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    index = _random_index(num_tokens, top_k, num_experts, seed=num_tokens).to(DEVICE)
    if num_experts > 2:
        index[: num_tokens // 2, 0] = 1  # a crowded expert: ties broken by index
    gates = torch.rand(num_tokens, top_k, generator=g).to(DEVICE, torch.bfloat16)
    keep = (torch.rand(num_tokens, top_k, generator=g) > 0.3).to(DEVICE) if drops else None
    ref = make_plan(index, gates, keep, num_experts)
    got = fused_plan(index, gates, keep, num_experts)
    for name in ("order", "token", "expert", "counts", "offsets", "gate"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got.num_tokens, got.top_k, got.num_experts, got.may_drop) == (num_tokens, top_k, num_experts, drops)


def test_make_plan_takes_the_fused_planner_on_cuda_only() -> None:
    from hf_moe_opt.dispatch.plan import _fused_planner

    planner = _fused_planner()
    # Compiled kernels: the planner module; the interpreter (CPU) never plans with it.
    assert (planner is None) == kernels_interpreted()
    if planner is not None:
        assert planner.fits(64, 128) and not planner.fits(0, 8) and not planner.fits(planner.MAX_ROWS + 1, 8)


@pytest.mark.parametrize(
    ("split_k", "top_k", "dtype"), [(2, 1, torch.float32), (3, 2, torch.bfloat16), (4, 2, torch.float32)]
)
def test_split_k_gemm2(split_k: int, top_k: int, dtype: torch.dtype) -> None:
    # K = 72 over 16-wide K tiles: splits of unequal tile counts; drops and bias through the combine.
    num_tokens, num_experts, hidden, ffn = 19, 5, 40, 72
    g = torch.Generator().manual_seed(80 + split_k)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    keep = torch.rand(num_tokens, top_k, generator=g) > 0.25
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=81), num_experts, keep)
    w1, b1, w2, b2 = _weights(num_experts, hidden, ffn, dtype, bias=True, seed=82)
    config = KernelConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, split_k=split_k)
    out = _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], out_scale=0.5, config=config)
    all_dropped = ~keep.any(dim=1)
    assert (out[all_dropped.to(DEVICE)] == 0).all()
    # Deterministic: the partials are summed in a fixed order.
    again = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], 0.5, config, config)
    assert torch.equal(out, again)
    with pytest.raises(ValueError):
        KernelConfig(16, 16, 16, split_k=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(1, 2, 48), (37, 3, 1100), (5, 8, 16), (9, 1, 33)])
def test_slot_sum_equals_fp32_sum(dtype: torch.dtype, tokens: int, top_k: int, hidden: int) -> None:
    from hf_moe_opt.kernels.moe_ffn import slot_sum

    g = torch.Generator().manual_seed(tokens * 100 + top_k)
    slots = torch.randn(tokens * top_k, hidden, generator=g).to(DEVICE, dtype)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    got = slot_sum(slots, top_k, out)
    assert got.data_ptr() == out.data_ptr()
    # Summed in fp32 in slot order, rounded once.
    want = slots.view(tokens, top_k, hidden).float()
    acc = want[:, 0]
    for j in range(1, top_k):
        acc = acc + want[:, j]
    if kernels_interpreted() and dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 toward zero; compiled kernels round to nearest even.
        acc = (acc.view(torch.int32) & ~0xFFFF).view(torch.float32)
    torch.testing.assert_close(got, acc.to(dtype), rtol=0, atol=0)


def test_slot_sum_rejects_mismatched_shapes() -> None:
    from hf_moe_opt.kernels.moe_ffn import slot_sum

    slots = torch.zeros(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="slot_sum"):
        slot_sum(slots, 2, torch.zeros(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="slot_sum"):
        slot_sum(slots, 2, torch.zeros(8, 3, device=DEVICE).t())


def test_fit_shared_memory() -> None:
    from hf_moe_opt.kernels.launch_config import fit_shared_memory, shared_memory_bytes

    h200 = 232448
    # The default list's 16384-token entry on gated experts: 320 KiB of pipeline -> fits after shrinking.
    wide = KernelConfig(128, 256, 64, num_warps=8, num_stages=4)
    assert shared_memory_bytes(wide, 2, 2, 2) == 327680
    fitted = fit_shared_memory(wide, 2, 2, 2, h200)
    assert fitted == KernelConfig(128, 128, 64, num_warps=8, num_stages=3)
    assert fit_shared_memory(wide, 2, 2, 1, h200) == wide  # non-gated bf16 fits as tuned
    assert fit_shared_memory(wide, 4, 4, 1, h200) == KernelConfig(128, 128, 64, num_warps=8, num_stages=3)
    # Nothing left to shrink: returned as small as it gets (the compiler reports the rest).
    tiny = fit_shared_memory(KernelConfig(16, 16, 16, num_stages=2), 2, 2, 2, 100)
    assert tiny == KernelConfig(16, 16, 16, num_stages=2)


@pytest.mark.gpu
def test_untuned_wide_config_on_gated_experts_gpu() -> None:
    # A table entry too big for gated W1 tiles (the H200 default at 16384 tokens) is shrunk, not fatal.
    num_tokens, top_k, num_experts, hidden, ffn = 2048, 2, 4, 512, 1024
    g = torch.Generator().manual_seed(90)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, torch.bfloat16)
    w1, _, _, _ = _weights(num_experts, hidden, 2 * ffn, torch.bfloat16, False, seed=91)
    _, _, w2, _ = _weights(num_experts, hidden, ffn, torch.bfloat16, False, seed=92)
    plan = _plan(_random_index(num_tokens, top_k, num_experts, seed=93), num_experts)
    wide = KernelConfig(128, 256, 64, num_warps=8, num_stages=4)
    out = moe_ffn_with_configs(x, plan, w1, None, w2, None, GATED["glu_silu"], 1.0, wide, wide)
    ref = torch_moe_ffn(x, plan, w1, None, w2, None, GATED["glu_silu"])
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


def test_same_architecture_table(tmp_path, monkeypatch) -> None:
    import json

    from hf_moe_opt.kernels.launch_config import table_name

    # Hopper GPUs without a table of their own use the H200's; other GPUs their own name (the
    # default table, as no file matches).
    assert table_name("NVIDIA H100 80GB HBM3", (9, 0)) == "NVIDIA H200"
    assert table_name("NVIDIA H200", (9, 0)) == "NVIDIA H200"
    assert table_name("NVIDIA A100-SXM4-80GB", (8, 0)) == "NVIDIA A100-SXM4-80GB"
    # A GPU's own table wins over its architecture's.
    entry = {"tokens": 1, "gemm1": TINY.to_dict(), "gemm2": TINY.to_dict()}
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps({"default": [entry]}))
    monkeypatch.setenv("HF_MOE_OPT_TRITON_CONFIGS", str(tmp_path))
    try:
        assert table_name("NVIDIA H100 80GB HBM3", (9, 0)) == "NVIDIA H100 80GB HBM3"
    finally:
        monkeypatch.delenv("HF_MOE_OPT_TRITON_CONFIGS")
        clear_cache()


def _crafted_index(kept: list[int], top_k: int, dropped: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, top_k]`` expert choices (distinct per token) and keep mask with exactly ``kept[e]`` kept
    rows on expert ``e``, plus ``dropped`` dropped assignments spread over the experts."""
    experts = [e for e, c in enumerate(kept) for _ in range(c)] + [i % len(kept) for i in range(dropped)]
    flags = [True] * sum(kept) + [False] * dropped
    assert len(experts) % top_k == 0
    slots = sorted(zip(experts, flags, strict=True), key=lambda s: s[0])
    num_tokens = len(slots) // top_k
    # Token t takes sorted slots t, t + N, ...: distinct experts while no expert holds more than N.
    assert max(Counter(experts).values()) <= num_tokens
    index = torch.tensor([e for e, _ in slots]).view(top_k, num_tokens).t()
    keep = torch.tensor([f for _, f in slots]).view(top_k, num_tokens).t()
    perm = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))
    return index[perm], keep[perm]


def _crafted_problem(kept, top_k, dropped, act, dtype, bias, shape, seed):
    """A plan with exactly ``kept[e]`` kept rows on expert ``e`` (plus ``dropped`` dropped assignments),
    its inputs and expert weights: ``(plan, keep, x, activation, w1, b1, w2, b2)``."""
    hidden, ffn = shape
    index, keep = _crafted_index(kept, top_k, dropped, seed=seed)
    plan = _plan(index, len(kept), keep, seed=seed + 1)
    assert plan.counts.tolist() == kept
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(index.shape[0], hidden, generator=g).to(DEVICE, dtype)
    activation = GATED[act] if act in GATED else ACTIVATIONS[act]
    w1, b1, _, _ = _weights(len(kept), hidden, ffn * (2 if act in GATED else 1), dtype, bias, seed=seed + 3)
    _, _, w2, b2 = _weights(len(kept), hidden, ffn, dtype, bias, seed=seed + 4)
    return plan, keep, x, activation, w1, b1, w2, b2


def _tile_heights(monkeypatch) -> dict[str, set[int]]:
    """Tile heights each kernel instantiates, recorded per call of its tile helper (interpreter only)."""
    import importlib
    import inspect

    module = importlib.import_module("hf_moe_opt.kernels.moe_ffn")
    seen: dict[str, set[int]] = {"gemm1": set(), "gemm2": set()}
    for kernel, name in (("gemm1", "_gather_gemm_act_tile"), ("gemm2", "_gemm_scatter_tile")):
        tile = getattr(module, name)
        at = list(inspect.signature(tile.fn).parameters).index("BLOCK_M")

        def spy(*args, _tile=tile, _at=at, _kernel=kernel):
            seen[_kernel].add(int(getattr(args[_at], "value", args[_at])))
            return _tile(*args)

        monkeypatch.setattr(module, name, spy)
    return seen


# Rows per expert around the tail height: fewer, exactly, one more, none, a full tile, and longer
# groups ending in each kind of last tile.
def _tail_counts(block_m: int, tail_m: int) -> list[int]:
    return [3, tail_m, tail_m + 1, 0, block_m, block_m + tail_m, 2 * block_m + tail_m + 1, 1]


@pytest.mark.parametrize(
    ("block_m", "tail_m", "top_k", "dtype", "act", "bias", "split_k", "dropped", "shape"),
    [
        (64, 16, 1, torch.float32, "relu", True, 1, 0, (32, 48)),
        (64, 32, 2, torch.bfloat16, "glu_silu", False, 2, 6, (32, 48)),
        (32, 16, 2, torch.float32, "gelu", True, 2, 4, (40, 72)),
        (32, 16, 1, torch.bfloat16, "silu", True, 1, 3, (24, 40)),
        (256, 128, 2, torch.bfloat16, "relu", True, 1, 2, (32, 48)),
    ],
    ids=["64-16-fp32", "64-32-bf16-glu-split", "32-16-fp32-top2-partial-k", "32-16-bf16", "256-128-bf16-top2"],
)
def test_tail_tiles_equal_full_tiles(
    monkeypatch, block_m, tail_m, top_k, dtype, act, bias, split_k, dropped, shape
) -> None:
    # An expert's short last row tile as a tail_m-row tile: the same K tiles in the same order, so the
    # interpreter's results equal the full-height tiles' bit for bit (both kernels, h and output).
    from hf_moe_opt.kernels.moe_ffn import KernelActivation, gather_gemm_act

    hidden, ffn = shape
    kept = _tail_counts(block_m, tail_m)
    plan, keep, x, activation, w1, b1, w2, b2 = _crafted_problem(
        kept, top_k, dropped, act, dtype, bias, shape, seed=90 + block_m + tail_m
    )
    full = KernelConfig(block_m=block_m, block_n=32, block_k=16, num_stages=2, split_k=split_k)
    tail = KernelConfig(block_m=block_m, block_n=32, block_k=16, num_stages=2, split_k=split_k, tail_m=tail_m)
    heights = _tile_heights(monkeypatch) if kernels_interpreted() else None
    out = _check(x, plan, w1, b1, w2, b2, activation, out_scale=0.5, config=tail)
    if heights is not None:  # both heights ran in both kernels
        assert heights == {"gemm1": {block_m, tail_m}, "gemm2": {block_m, tail_m}}
    ref = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, activation, 0.5, full, full)
    # GEMM1 alone: the same h rows written, rows of dropped assignments left alone.
    kernel_act = KernelActivation.of(activation, ffn)
    h_full, h_tail = (torch.full((plan.num_rows, ffn), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    gather_gemm_act(x, plan, w1, b1, kernel_act, h_full, full)
    gather_gemm_act(x, plan, w1, b1, kernel_act, h_tail, tail)
    assert torch.isnan(h_tail[sum(kept) :]).all()
    if DEVICE.type == "cpu" and dtype != torch.float32:
        assert torch.equal(out, ref)
        torch.testing.assert_close(h_tail, h_full, rtol=0, atol=0, equal_nan=True)
    elif DEVICE.type == "cpu":  # the interpreter's fp32 matmul (BLAS) may order an M-row tile's FMAs by M
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h_tail, h_full, rtol=1e-6, atol=1e-6, equal_nan=True)
    else:  # other MMA shapes on a GPU may round differently
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
        torch.testing.assert_close(h_tail.float(), h_full.float(), atol=atol, rtol=rtol, equal_nan=True)
    if dropped:
        assert (out[~keep.any(dim=1).to(DEVICE)] == 0).all()


def test_tail_tiles_one_expert_and_one_token(monkeypatch) -> None:
    # Every row on one expert (the other empty), groups long enough for unmasked row loads, ending in
    # a tile of exactly tail_m rows; then a single token on one and on two experts.
    from hf_moe_opt.kernels.moe_ffn import _mask_rows

    full = KernelConfig(block_m=32, block_n=32, block_k=16, num_stages=2)
    tail = KernelConfig(block_m=32, block_n=32, block_k=16, num_stages=2, tail_m=16)
    hidden, ffn = 32, 48
    w1, b1, w2, b2 = _weights(2, hidden, ffn, torch.float32, bias=True, seed=95)
    num_tokens = 8 * 32 + 16
    assert not _mask_rows(num_tokens, 2, full.block_m)
    g = torch.Generator().manual_seed(96)
    cases = [(torch.randn(num_tokens, hidden, generator=g), torch.ones(num_tokens, 1, dtype=torch.long))]
    cases += [
        (torch.randn(1, hidden, generator=g), torch.tensor([[1]])),
        (torch.randn(1, hidden), torch.tensor([[1, 0]])),
    ]
    heights = _tile_heights(monkeypatch) if kernels_interpreted() else None
    for x, index in cases:
        x, plan = x.to(DEVICE), _plan(index, 2, seed=97)
        out = _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], out_scale=2.0, config=tail)
        ref = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], 2.0, full, full)
        # fp32: the interpreter's matmul (BLAS) may order a tile's FMAs by its height; GPUs' MMAs too.
        tol = 1e-6 if DEVICE.type == "cpu" else 1e-5
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if heights is not None:
        assert heights == {"gemm1": {32, 16}, "gemm2": {32, 16}}


def test_tail_m_config() -> None:
    import json

    from hf_moe_opt.kernels.launch_config import fit_shared_memory

    for bad in (64, 128, 24, 8, -16):  # not below block_m, not a power of two, too small, negative
        with pytest.raises(ValueError, match="tail_m"):
            KernelConfig(64, 64, 32, tail_m=bad)
    with pytest.raises(ValueError, match="tail_m"):
        KernelConfig(16, 64, 32, tail_m=16)  # no tile height below 16
    cfg = KernelConfig(128, 128, 64, num_warps=8, tma=1, tail_m=64)
    assert cfg.to_dict()["tail_m"] == 64 and KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert "tail_m" not in KernelConfig(128, 128, 64).to_dict()  # the default stays out of the tables
    assert KernelConfig.from_dict({"block_m": 64, "block_n": 64, "block_k": 32}).tail_m == 0
    # Shrinking to the shared memory keeps block_m, so the tail height stays valid.
    fitted = fit_shared_memory(KernelConfig(128, 256, 64, num_warps=8, num_stages=4, tail_m=32), 2, 2, 2, 232448)
    assert fitted.tail_m == 32 and fitted.block_m == 128 and fitted.block_n == 128
    # Through a config table on disk.
    with_tail = KernelConfig(64, 32, 16, num_stages=2, tail_m=16)
    entry = {"tokens": 16, "gemm1": with_tail.to_dict(), "gemm2": SMALL.to_dict()}
    import tempfile

    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        with open(f"{folder}/{device_file_stem('default')}.json", "w") as f:
            json.dump({"shapes": {shape_key(3, 8, 16, 1): [entry]}}, f)
        mp.setenv("HF_MOE_OPT_TRITON_CONFIGS", folder)
        clear_cache()
        try:
            assert get_configs(torch.device("cpu"), 3, 8, 16, 1, 16) == (with_tail, SMALL)
        finally:
            mp.delenv("HF_MOE_OPT_TRITON_CONFIGS")
            clear_cache()


@pytest.mark.parametrize(
    ("block_m", "top_k", "dtype", "act", "bias", "dropped", "shape", "tma", "flatten"),
    [
        (16, 1, torch.float32, "relu", True, 0, (32, 48), 0, 1),
        (16, 2, torch.bfloat16, "glu_silu", False, 6, (32, 48), 1, 1),
        (32, 2, torch.float32, "gelu", True, 4, (40, 72), 0, 0),
        (16, 1, torch.bfloat16, "silu", True, 40, (24, 40), 1, 0),
    ],
    ids=["16-fp32", "16-bf16-glu-dropped-tma", "32-fp32-top2-partial-k-unflattened", "16-bf16-many-dropped"],
)
def test_persistent_launch_equals_one_tile_per_program(block_m, top_k, dtype, act, bias, dropped, shape, tma, flatten):
    # A fixed grid looping over the tiles computes the same tiles in the same K order as one program per
    # tile: equal to the reference, and to the plain launch bit for bit (h and output; dropped rows
    # zero). The groups: empty experts, single rows, exact and partial tiles, many tiles on one expert;
    # with the interpreter's 3 "SMs" every program loops over several tiles, and 40 dropped rows (top-1)
    # take more tiles than there are programs.
    from hf_moe_opt.kernels.moe_ffn import KernelActivation, _grid, gather_gemm_act, gemm_scatter

    hidden, ffn = shape
    kept = [3, 0, block_m, 1, 2 * block_m + 5, 0, 3 * block_m + 1]
    plan, keep, x, activation, w1, b1, w2, b2 = _crafted_problem(
        kept, top_k, dropped, act, dtype, bias, shape, seed=70 + block_m + dropped
    )
    plain = KernelConfig(block_m=block_m, block_n=32, block_k=16, num_stages=2, tma=tma)
    looped = KernelConfig(block_m=block_m, block_n=32, block_k=16, num_stages=2, tma=tma, persistent=1, flatten=flatten)
    grid = _grid(plan.num_rows, len(kept), block_m, ffn, 32, looped.persistent, DEVICE)[0]
    tiles = _grid(plan.num_rows, len(kept), block_m, ffn, 32, 0, DEVICE)[0]
    assert grid <= tiles
    if DEVICE.type == "cpu":
        assert grid < tiles  # the persistent programs do loop (on a GPU: where the tiles outnumber the SMs)
    out = _check(x, plan, w1, b1, w2, b2, activation, out_scale=0.5, config=looped)
    ref = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, activation, 0.5, plain, plain)
    kernel_act = KernelActivation.of(activation, ffn)
    h_plain, h_looped = (torch.full((plan.num_rows, ffn), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    gather_gemm_act(x, plan, w1, b1, kernel_act, h_plain, plain)
    gather_gemm_act(x, plan, w1, b1, kernel_act, h_looped, looped)
    assert torch.isnan(h_looped[sum(kept) :]).all()  # rows of dropped assignments stay unwritten
    if DEVICE.type == "cpu":
        assert torch.equal(out, ref)
        torch.testing.assert_close(h_looped, h_plain, rtol=0, atol=0, equal_nan=True)
    else:  # other pipelining on a GPU may not change the MMAs, but tolerate rounding
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    if dropped:
        assert (out[~keep.any(dim=1).to(DEVICE)] == 0).all()
        assert (out[keep.any(dim=1).to(DEVICE)].abs().sum(dim=1) > 0).all()
        # GEMM2 alone into NaNs: every slot written, the dropped ones with zeros.
        slots = torch.full((plan.num_tokens * top_k, hidden), float("nan"), dtype=dtype, device=DEVICE)
        gemm_scatter(h_looped, plan, w2, b2, 0.5, slots, looped)
        dropped_slots = plan.order[sum(kept) :]
        assert not torch.isnan(slots).any() and (slots[dropped_slots] == 0).all()


@pytest.mark.parametrize(
    ("block_m", "tail_m", "top_k", "dtype", "act", "dropped", "tma", "flatten"),
    [
        (64, 16, 1, torch.float32, "relu", 0, 0, 1),
        (32, 16, 2, torch.bfloat16, "glu_silu", 6, 1, 0),
        (64, 32, 1, torch.bfloat16, "gelu", 40, 1, 1),
    ],
    ids=["64-16-fp32", "32-16-bf16-glu-top2-tma-unflattened", "64-32-bf16-many-dropped"],
)
def test_persistent_launch_with_tail_tiles(monkeypatch, block_m, tail_m, top_k, dtype, act, dropped, tma, flatten):
    # Tail tiles inside the persistent loop: each looped tile takes its height's branch. Groups end in
    # every kind of last tile; the result equals one full-height tile per program bit for bit (CPU).
    from hf_moe_opt.kernels.moe_ffn import _grid

    shape = (32, 48)
    kept = _tail_counts(block_m, tail_m)
    plan, keep, x, activation, w1, b1, w2, b2 = _crafted_problem(
        kept, top_k, dropped, act, dtype, True, shape, seed=110 + block_m + tail_m + dropped
    )
    plain = KernelConfig(block_m=block_m, block_n=32, block_k=16, num_stages=2, tma=tma)
    looped = KernelConfig(
        block_m=block_m, block_n=32, block_k=16, num_stages=2, tma=tma, tail_m=tail_m, persistent=1, flatten=flatten
    )
    if DEVICE.type == "cpu":  # the 3 interpreted "SMs" loop over more tiles than they are
        assert (
            _grid(plan.num_rows, len(kept), block_m, shape[1], 32, 1, DEVICE)[0]
            < _grid(plan.num_rows, len(kept), block_m, shape[1], 32, 0, DEVICE)[0]
        )
    heights = _tile_heights(monkeypatch) if kernels_interpreted() else None
    out = _check(x, plan, w1, b1, w2, b2, activation, out_scale=0.5, config=looped)
    if heights is not None:
        assert heights == {"gemm1": {block_m, tail_m}, "gemm2": {block_m, tail_m}}
    ref = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, activation, 0.5, plain, plain)
    if DEVICE.type == "cpu" and dtype != torch.float32:
        assert torch.equal(out, ref)
    elif DEVICE.type == "cpu":  # the interpreter's fp32 matmul (BLAS) may order an M-row tile's FMAs by M
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    if dropped:
        assert (out[~keep.any(dim=1).to(DEVICE)] == 0).all()


@pytest.mark.parametrize("num_tokens", [1, 2, 37])
def test_persistent_launch_one_expert_and_few_tokens(num_tokens: int) -> None:
    # Every token on one expert of four (the rest empty); one token; grids smaller than the SMs.
    looped = KernelConfig(block_m=16, block_n=16, block_k=16, num_stages=2, persistent=2)
    w1, b1, w2, b2 = _weights(4, 24, 40, torch.float32, bias=True, seed=73)
    x = torch.randn(num_tokens, 24, generator=torch.Generator().manual_seed(74)).to(DEVICE)
    plan = _plan(torch.full((num_tokens, 1), 2, dtype=torch.long), 4, seed=75)
    _check(x, plan, w1, b1, w2, b2, ACTIVATIONS["gelu"], out_scale=1.5, config=looped)


def test_persistent_config() -> None:
    for bad in ({"persistent": -1}, {"flatten": 2}, {"persistent": 1, "split_k": 2}):
        with pytest.raises(ValueError, match="persistent|flatten"):
            KernelConfig(64, 64, 32, **bad)
    assert KernelConfig(64, 64, 32, persistent=1, tail_m=32).tail_m == 32  # tail tiles inside the loop
    cfg = KernelConfig(128, 256, 64, num_warps=8, persistent=2, flatten=0)
    assert cfg.to_dict()["persistent"] == 2 and KernelConfig.from_dict(cfg.to_dict()) == cfg
    plain = KernelConfig(128, 128, 64).to_dict()
    assert "persistent" not in plain and "flatten" not in plain  # defaults stay out of the tables
