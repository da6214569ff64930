"""The kernels' TMA loads (``KernelConfig.tma``) against the pointer loads and the torch reference.

On CPU triton's interpreter runs the descriptor loads; on an H100/H200 the compiled TMA path.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

from hf_moe_opt.dispatch import make_plan  # noqa: E402
from hf_moe_opt.experts.activation import Activation, glu_activation  # noqa: E402
from hf_moe_opt.experts.torch_backend import torch_moe_ffn  # noqa: E402
from hf_moe_opt.kernels import KernelConfig, kernels_interpreted, moe_ffn_with_configs  # noqa: E402
from hf_moe_opt.kernels.moe_ffn import _tma_matrix, tma_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if not tma_available(DEVICE):
    pytest.skip("TMA loads need a Hopper GPU (or the interpreter) and a TensorDescriptor", allow_module_level=True)

RELU = Activation("relu", torch.relu)
GELU = Activation("gelu", torch.nn.functional.gelu)
GLU_SILU = glu_activation("silu", torch.nn.functional.silu)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}


def _config(tma: int, split_k: int = 1, group_m: int = 8) -> KernelConfig:
    return KernelConfig(block_m=16, block_n=16, block_k=16, num_stages=2, split_k=split_k, group_m=group_m, tma=tma)


def _case(
    num_tokens,
    top_k,
    num_experts,
    hidden,
    ffn,
    dtype,
    *,
    gated=False,
    bias=True,
    drop=0.0,
    seed=0,
    index=None,
    keep=None,
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x = rnd(num_tokens, hidden, scale=1.0)
    w1 = rnd(num_experts, (2 if gated else 1) * ffn, hidden, scale=1 / math.sqrt(hidden))
    w2 = rnd(num_experts, hidden, ffn, scale=1 / math.sqrt(ffn))
    b1 = rnd(num_experts, w1.shape[1], scale=0.5) if bias else None
    b2 = rnd(num_experts, hidden, scale=0.5) if bias else None
    if index is None:
        index = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    gates = torch.rand(index.shape, generator=g)
    if keep is None:
        keep = torch.rand(index.shape, generator=g) >= drop
    plan = make_plan(index.to(DEVICE), gates.to(DEVICE), keep.to(DEVICE), num_experts)
    return x, plan, w1, b1, w2, b2


def _compare(x, plan, w1, b1, w2, b2, act, split_k=1, group_m=8, gemm2_tma=1):
    # The layouts used here must really take the TMA path, or this compares pointer loads to themselves.
    h = torch.empty(max(plan.num_rows, 1), w2.shape[2], dtype=w2.dtype, device=x.device)
    assert _tma_matrix(w1, 16, 16) is not None and _tma_matrix(w2, 16, 16) is not None
    assert _tma_matrix(h, 16, 16) is not None
    g1, g2 = _config(1, group_m=group_m), _config(gemm2_tma, split_k)
    tma = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, act, 0.5, g1, g2)
    ptr = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, act, 0.5, _config(0, group_m=group_m), _config(0, split_k))
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, act, 0.5)
    atol, rtol = TOL[w1.dtype]
    torch.testing.assert_close(tma.float(), ref.float(), atol=atol, rtol=rtol)
    # Same tiles, same accumulation order: only the way tiles reach the dot differs.
    if DEVICE.type == "cpu":
        assert torch.equal(tma, ptr)
    else:
        torch.testing.assert_close(tma.float(), ptr.float(), atol=atol, rtol=rtol)
    return tma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("top_k", "drop"), [(1, 0.0), (2, 0.25)])
def test_tma_random_routing(dtype: torch.dtype, top_k: int, drop: float) -> None:
    # 37 tokens and D=40, F=72: groups, N and K all end inside a tile.
    _compare(*_case(37, top_k, 6, 40, 72, dtype, drop=drop, seed=1 + top_k), GELU)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("gemm2_tma", [1, 2])
def test_tma_gated_and_split_k(split_k: int, gemm2_tma: int) -> None:
    # Concatenated gate/up halves of W1 (two descriptor loads per K tile); GEMM2 split over K, its
    # rows of h by TMA (1) or by pointer beside TMA weight tiles (2).
    case = _case(29, 2, 5, 32, 48, torch.bfloat16, gated=True, drop=0.1, seed=7)
    _compare(*case, GLU_SILU, split_k=split_k, gemm2_tma=gemm2_tma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_weights_only_with_partial_k(dtype: torch.dtype) -> None:
    # tma=2 in GEMM2: pointer rows of h with K masks (F=72 ends inside a K tile) and dropped rows.
    _compare(*_case(37, 2, 6, 40, 72, dtype, drop=0.25, seed=8), GELU, gemm2_tma=2)


def test_tma_odd_shapes() -> None:
    # One token; every token on one expert (others empty) over many row tiles and GROUP_M groups.
    _compare(*_case(1, 2, 4, 32, 48, torch.float32, seed=11), RELU)
    index = torch.full((70, 1), 3)
    _compare(*_case(70, 1, 4, 32, 48, torch.bfloat16, bias=False, seed=12, index=index), RELU, group_m=2)
    # Groups of 4+ row tiles: GEMM2's pointer rows beside TMA weights load unmasked.
    from hf_moe_opt.kernels.moe_ffn import _mask_rows

    assert not _mask_rows(140, 2, 16)
    _compare(*_case(140, 1, 2, 32, 48, torch.float32, seed=15), RELU, gemm2_tma=2)


@pytest.mark.parametrize(
    ("gemm1_tma", "gemm2_tma", "split_k", "gated", "dtype"),
    [(1, 1, 1, False, torch.float32), (1, 1, 2, True, torch.bfloat16), (0, 2, 1, True, torch.float32)],
    ids=["tma1", "tma1-glu-split", "tma2-glu"],
)
def test_tma_tail_tiles(
    monkeypatch, gemm1_tma: int, gemm2_tma: int, split_k: int, gated: bool, dtype: torch.dtype
) -> None:
    # Short last row tiles (16 of 32 rows) keep their TMA weight tiles; GEMM2 loads their rows of h by
    # pointer (h's descriptor has 32-row tiles). Same results as full tiles and as pointer loads.
    from .test_triton_kernels import _crafted_index, _tail_counts, _tile_heights

    kept = _tail_counts(32, 16)
    index, keep = _crafted_index(kept, 2, dropped=4, seed=40 + split_k)
    x, plan, w1, b1, w2, b2 = _case(
        index.shape[0], 2, len(kept), 32, 48, dtype, gated=gated, seed=41, index=index, keep=keep
    )
    assert plan.counts.tolist() == kept
    act = GLU_SILU if gated else GELU
    h = torch.empty(plan.num_rows, 48, dtype=dtype, device=DEVICE)
    assert _tma_matrix(w1, 32, 16) is not None and _tma_matrix(w2, 32, 16) is not None
    assert _tma_matrix(h, 32, 16) is not None

    def run(tma1: int, tma2: int, tail_m: int) -> torch.Tensor:
        g1, g2 = (KernelConfig(32, 32, 16, num_stages=2, tma=t, tail_m=tail_m) for t in (tma1, tma2))
        return moe_ffn_with_configs(x, plan, w1, b1, w2, b2, act, 0.5, g1, replace(g2, split_k=split_k))

    heights = _tile_heights(monkeypatch) if DEVICE.type == "cpu" else None
    out = run(gemm1_tma, gemm2_tma, 16)
    if heights is not None:
        assert heights == {"gemm1": {32, 16}, "gemm2": {32, 16}}
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, act, 0.5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    for other in (run(gemm1_tma, gemm2_tma, 0), run(0, 0, 16)):
        if DEVICE.type == "cpu" and dtype != torch.float32:
            assert torch.equal(out, other)
        elif DEVICE.type == "cpu":  # the interpreter's fp32 matmul (BLAS) may order a tile's FMAs by its height
            torch.testing.assert_close(out, other, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(out.float(), other.float(), atol=atol, rtol=rtol)


def test_tma_falls_back_where_layout_forbids() -> None:
    # Rows whose byte stride is not a multiple of 16 cannot be described: pointer loads, same result.
    x, plan, w1, b1, w2, b2 = _case(19, 1, 3, 20, 36, torch.bfloat16, seed=13)
    assert _tma_matrix(w1, 16, 16) is None  # 20 bf16 = 40 bytes per row
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, RELU)
    out = moe_ffn_with_configs(x, plan, w1, b1, w2, b2, RELU, 1.0, _config(1), _config(1))
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    # A transposed weight view has no unit column stride.
    assert _tma_matrix(w2.transpose(1, 2).contiguous().transpose(1, 2), 16, 16) is None


def test_tma_detects_wrong_rows() -> None:
    # The comparison can fail: experts swapped in W2 are caught on the TMA path.
    x, plan, w1, b1, w2, b2 = _case(23, 1, 4, 32, 48, torch.float32, seed=14)
    ref = torch_moe_ffn(x, plan, w1, b1, w2, b2, RELU)
    out = moe_ffn_with_configs(x, plan, w1, b1, w2.flip(0).contiguous(), b2, RELU, 1.0, _config(1), _config(1))
    assert not torch.allclose(out, ref, atol=1e-3)


def test_config_knobs_round_trip() -> None:
    cfg = KernelConfig(64, 128, 64, num_warps=8, group_m=4, tma=1)
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert "tma" not in KernelConfig(64, 128, 64).to_dict()  # defaults stay out of the tables
    assert KernelConfig.from_dict(KernelConfig(64, 128, 64, tma=2).to_dict()).tma == 2
    with pytest.raises(ValueError):
        KernelConfig(64, 128, 64, tma=3)
    with pytest.raises(ValueError):
        KernelConfig(64, 128, 64, group_m=0)


# Table shapes of gated experts (the table keys do not say): Mixtral-8x7B, Qwen3-30B-A3B.
GATED_SHAPES = {"E8_D4096_F14336_k2", "E128_D2048_F768_k8"}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.gpu
def test_tma_real_shape_graph_replay() -> None:
    # Compiled TMA kernels at a gated Mixtral-like shape, captured once and replayed on new routing;
    # each replay equals the pointer-load kernels with the same tiles and the bf16 reference.
    num_tokens, top_k, num_experts, hidden, ffn = 512, 2, 8, 1024, 2048
    x, _, w1, b1, w2, b2 = _case(num_tokens, top_k, num_experts, hidden, ffn, torch.bfloat16, gated=True, seed=20)
    index = torch.rand(num_tokens, num_experts, device=DEVICE).topk(top_k, dim=1).indices
    gates = torch.rand(num_tokens, top_k, device=DEVICE)
    keep = torch.ones(num_tokens, top_k, dtype=torch.bool, device=DEVICE)
    big = {t: KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3, tma=t) for t in (0, 1)}

    def step(tma: int) -> torch.Tensor:
        plan = make_plan(index, gates, keep, num_experts)
        return moe_ffn_with_configs(x, plan, w1, b1, w2, b2, GLU_SILU, 1.0, big[tma], big[tma])

    step(1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(1)
    for _ in range(2):
        index.copy_(torch.rand(num_tokens, num_experts, device=DEVICE).topk(top_k, dim=1).indices)
        keep.copy_(torch.rand(num_tokens, top_k, device=DEVICE) > 0.2)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        pointer = step(0)
        ref = torch_moe_ffn(x, make_plan(index, gates, keep, num_experts), w1, b1, w2, b2, GLU_SILU)
        assert _rel_err(out, pointer) < 1e-3
        assert _rel_err(out, ref) < 1e-2
        assert (out[~keep.any(dim=1)] == 0).all()


@pytest.mark.gpu
def test_tuned_tma_configs_gpu() -> None:
    # Every shipped H200 table entry that loads by TMA, at its own shape and token count (<= 4096).
    from hf_moe_opt.kernels.launch_config import device_name, load_table

    by_shape: dict[str, list[dict]] = {}
    for key, rows in load_table(device_name(DEVICE))[0].get("shapes", {}).items():
        by_shape[key] = [e for e in rows if e["gemm1"].get("tma") or e["gemm2"].get("tma")]
    if not any(by_shape.values()):
        pytest.skip("this GPU's table has no TMA entries")
    gen = torch.Generator(device=DEVICE).manual_seed(30)
    for key, entries in by_shape.items():
        if not entries:
            continue
        e, d, f, k = (int(part[1:]) for part in key.split("_"))
        gated = key in GATED_SHAPES
        act = GLU_SILU if gated else RELU
        # Made on the device: the largest of these weights is 4 GiB.
        w1 = torch.randn(e, (2 if gated else 1) * f, d, device=DEVICE, generator=gen, dtype=torch.bfloat16) * d**-0.5
        w2 = torch.randn(e, d, f, device=DEVICE, generator=gen, dtype=torch.bfloat16) * f**-0.5
        for entry in entries:
            tokens = min(int(entry["tokens"]), 4096)
            x = torch.randn(tokens, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
            index = torch.rand(tokens, e, device=DEVICE, generator=gen).topk(k, dim=1).indices
            gates = torch.rand(tokens, k, device=DEVICE, generator=gen)
            plan = make_plan(index, gates, torch.ones_like(gates, dtype=torch.bool), e)
            g1, g2 = KernelConfig.from_dict(entry["gemm1"]), KernelConfig.from_dict(entry["gemm2"])
            out = moe_ffn_with_configs(x, plan, w1, None, w2, None, act, 1.0, g1, g2)
            no_tma = [KernelConfig.from_dict({**entry[g], "tma": 0}) for g in ("gemm1", "gemm2")]
            pointer = moe_ffn_with_configs(x, plan, w1, None, w2, None, act, 1.0, *no_tma)
            ref = torch_moe_ffn(x, plan, w1, None, w2, None, act)
            assert _rel_err(out, pointer) < 1e-3, (key, entry["tokens"])
            assert _rel_err(out, ref) < 1e-2, (key, entry["tokens"])
        del w1, w2
