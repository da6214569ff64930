"""The counting-sort dispatch plan (``large_plan``) against torch's plan (CPU: triton's interpreter, see conftest)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hf_moe_opt.dispatch.plan import DispatchPlan, _fused_planner, make_plan, torch_plan  # noqa: E402
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels.plan import MAX_ROWS, default_chunk, fits, fits_large, large_plan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

FIELDS = ("order", "token", "expert", "counts", "offsets", "gate")


def _assert_same(got: DispatchPlan, ref: DispatchPlan) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert (got.num_tokens, got.top_k, got.num_experts, got.may_drop) == (
        ref.num_tokens,
        ref.top_k,
        ref.num_experts,
        ref.may_drop,
    )


def _inputs(
    num_tokens: int, top_k: int, num_experts: int, seed: int, dtype: torch.dtype = torch.bfloat16, drop: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    if top_k <= num_experts:  # distinct experts per token, like a top-k router
        index = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    else:
        index = torch.randint(0, num_experts, (num_tokens, top_k), generator=g)
    gates = torch.rand(num_tokens, top_k, generator=g).to(dtype)
    keep = torch.rand(num_tokens, top_k, generator=g) >= drop if drop > 0 else None
    return index.to(DEVICE), gates.to(DEVICE), None if keep is None else keep.to(DEVICE)


@pytest.mark.parametrize("inline_scan", [True, False])
@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "chunk", "drop", "dtype"),
    [
        (301, 1, 7, 64, 0.0, torch.bfloat16),  # A not a multiple of the chunk
        (150, 2, 128, 64, 0.3, torch.float32),  # many empty experts, some dropped
        (40, 8, 300, 128, 0.2, torch.bfloat16),  # 320 rows over 300 experts
        (64, 8, 512, 128, 0.0, torch.float32),  # E = 512: 1024 bins
        (77, 2, 2, 32, 0.5, torch.bfloat16),  # heavy ties on two experts
        (200, 1, 1, 64, 0.0, torch.float32),  # one expert
        (9, 2, 5, 64, 0.4, torch.bfloat16),  # fewer rows than one chunk
    ],
)
def test_large_plan_equals_torch_plan(
    num_tokens: int, top_k: int, num_experts: int, chunk: int, drop: float, dtype: torch.dtype, inline_scan: bool
) -> None:
    index, gates, keep = _inputs(num_tokens, top_k, num_experts, seed=num_tokens * 7 + top_k, dtype=dtype, drop=drop)
    got = large_plan(index, gates, keep, num_experts, chunk=chunk, inline_scan=inline_scan)
    _assert_same(got, torch_plan(index, gates, keep, num_experts))


@pytest.mark.parametrize("keep_all", [True, False])
def test_large_plan_every_row_on_one_expert(keep_all: bool) -> None:
    # One group holds every row: the within-chunk rank and the chunk prefix alone order it.
    num_tokens, top_k, num_experts = 130, 2, 128
    index = torch.full((num_tokens, top_k), 77, device=DEVICE)
    index[:, 1] = 3
    gates = torch.rand(num_tokens, top_k, device=DEVICE)
    keep = torch.ones(num_tokens, top_k, dtype=torch.bool, device=DEVICE) if keep_all else None
    got = large_plan(index, gates, keep, num_experts, chunk=64)
    ref = torch_plan(index, gates, keep, num_experts)
    _assert_same(got, ref)
    assert got.may_drop == keep_all and int(got.counts[77]) == num_tokens and int(got.counts.sum()) == 2 * num_tokens


@pytest.mark.parametrize("inline_scan", [True, False])
def test_large_plan_everything_dropped(inline_scan: bool) -> None:
    index, gates, _ = _inputs(100, 2, 7, seed=5, dtype=torch.float32)
    keep = torch.zeros(100, 2, dtype=torch.bool, device=DEVICE)
    got = large_plan(index, gates, keep, 7, chunk=32, inline_scan=inline_scan)
    _assert_same(got, torch_plan(index, gates, keep, 7))
    assert not bool(got.kept_rows().any()) and not bool(got.gate.any())
    assert torch.equal(got.order, torch.arange(200, device=DEVICE))


def test_large_plan_default_chunk_and_int32_index() -> None:
    # The default chunk (256) over 2.3 chunks; router indices may come as int32.
    index, gates, keep = _inputs(300, 2, 64, seed=11, drop=0.1)
    got = large_plan(index.int(), gates, keep, 64)
    _assert_same(got, torch_plan(index, gates, keep, 64))
    assert default_chunk(600) == 256 and default_chunk(32768) == 256 and default_chunk(2**20) == 2048
    # Deterministic: no atomics across programs.
    again = large_plan(index.int(), gates, keep, 64)
    assert all(torch.equal(getattr(got, n), getattr(again, n)) for n in FIELDS)


def test_large_plan_counts_out_of_range_experts_as_dropped() -> None:
    # A bad index must not address a bin or row out of bounds: it sorts with the dropped rows.
    index, gates, keep = _inputs(120, 2, 16, seed=13, dtype=torch.float32, drop=0.2)
    index[5, 0], index[70, 1], index[71, 0] = 16, -1, 1000
    got = large_plan(index, gates, keep, 16, chunk=64)
    in_range = (index >= 0) & (index < 16)
    _assert_same(got, torch_plan(index, gates, keep & in_range, 16))


def test_large_plan_rejects_bad_arguments() -> None:
    index, gates, _ = _inputs(20, 1, 4, seed=1)
    with pytest.raises(ValueError, match="power of two"):
        large_plan(index, gates, None, 4, chunk=48)
    with pytest.raises(ValueError, match="large_plan handles"):
        large_plan(index[:0], gates[:0], None, 4)
    assert fits_large(1, 1) and fits_large(2**20, 512) and not fits_large(0, 8) and not fits_large(64, 2048)


def test_make_plan_takes_the_large_planner_past_the_small_one() -> None:
    # Compiled kernels only: the interpreter (CPU) plans in torch, so there is nothing to observe there.
    planner = _fused_planner()
    assert (planner is None) == kernels_interpreted()
    assert fits(MAX_ROWS, 512) and not fits(MAX_ROWS + 1, 512) and fits_large(MAX_ROWS + 1, 512)
    if planner is None:
        pytest.skip("make_plan plans in torch under the interpreter")
    index, gates, keep = _inputs(1024, 4, 128, seed=17, drop=0.1)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].numel())
        return large_plan(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "large_plan", spy)
        got = make_plan(index, gates, keep, 128)
        make_plan(index[:16], gates[:16], keep[:16], 128)  # 64 rows: the one-program plan
    assert calls == [4096]
    _assert_same(got, torch_plan(index, gates, keep, 128))


@pytest.mark.parametrize("planner", ["fused_plan", "large_plan"])
def test_strided_routing_views_plan_like_their_contiguous_copies(planner) -> None:
    """A router's outputs may be column slices (stride != width): the kernels index flat memory, so
    they must read the values, not the storage behind the view."""
    from hf_moe_opt.kernels import plan as kernels

    g = torch.Generator().manual_seed(3)
    wide = torch.rand(37, 6, generator=g).argsort(1).to(DEVICE)
    index = wide[:, 1:3]  # [N, 2] view, row stride 6
    gates = torch.rand(37, 4, generator=g).to(DEVICE, torch.bfloat16)[:, ::2]
    keep = (torch.rand(37, 6, generator=g) > 0.2).to(DEVICE)[:, :2]
    assert not (index.is_contiguous() or gates.is_contiguous() or keep.is_contiguous())
    _assert_same(getattr(kernels, planner)(index, gates, keep, 6), torch_plan(index, gates, keep, 6))
