"""How close the expert GEMMs can get to the floor: the layer's two GEMMs on an idealized problem.

    python benchmarks/ideal_gemm.py --tokens 16384 --out benchmarks/results/ideal_gemm_h200.json

The layer floor (bytes of the active experts over the copy bandwidth, or FLOPs over the matmul rate,
whichever is larger) assumes both at once. This script measures, in one run on one GPU, the two
expert GEMMs of each layer shape (GEMM1 ``[m, D] x [D, F]``, GEMM2 ``[m, F] x [F, D]`` per expert)
when nothing about routing gets in the way: every expert gets the same ``m = tokens * k / E`` rows,
stored contiguously in expert order:

* ``bmm``: ``torch.bmm`` over ``[E, m, .]`` (the vendor library's batched GEMM);
* ``triton_ideal``: a plain Triton per-expert GEMM over TMA descriptors (no gather, no scatter, no
  epilogue), the best of a few launch configurations;
* ``grouped_mm_{balanced,random}_gemm{1,2}``: the vendor's grouped GEMM (``torch._grouped_mm``) on
  rows already sorted by expert, with the balanced groups and with the group sizes of random routing;
* ``mma_rows_{balanced,random}``: rows the tensor cores multiply per routed row with 128-row tiles
  and 64-row tail tiles (the tile waste uneven groups cost any wgmma kernel);
* ``ours_balanced`` / ``ours_random``: :func:`hf_moe_opt.kernels.moe_ffn` (both GEMMs with the row
  gather, bias, activation, gate multiply, scatter and top-k combine) on a plan whose groups are all
  ``m`` rows, and on uniformly random top-k routing (uneven groups), the plan built beforehand.

Each beside the floor of the whole layer and of its two GEMMs (same ceilings, measured here). Times are
device time per call: ten calls captured in one CUDA graph, replays timed with CUDA events, medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from hf_moe_opt.benchmarking.common import json_out  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (BLOCK_N, num_stages, num_warps) tried for the plain Triton GEMM; BLOCK_M 128, BLOCK_K 64.
TRITON_CONFIGS = ((128, 3, 4), (128, 4, 4), (128, 4, 8), (256, 3, 8))
# Calls captured in one CUDA graph per timed replay.
CALLS = 10


def device_ms(fn, device: torch.device) -> float:
    """Device time per call of ``fn``: :data:`CALLS` calls captured in one CUDA graph, replays timed
    with CUDA events (median), so neither Python nor kernel launches count."""
    from hf_moe_opt.benchmarking.layer import graphed_calls_ms

    return graphed_calls_ms(lambda _: fn(), None, device, repeats=10, calls=CALLS)


def _triton_gemm():
    import triton
    import triton.language as tl

    @triton.jit
    def per_expert_gemm(a_desc, w_desc, out_ptr, rows, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # Program -> (expert, row tile, column tile), row tiles fastest; a is [E * rows, K], w [E * N, K].
        pid = tl.program_id(0)
        num_m = tl.cdiv(rows, BM)
        per_expert = num_m * tl.cdiv(N, BN)
        e = pid // per_expert
        row = e * rows + (pid % per_expert % num_m) * BM
        col = (pid % per_expert // num_m) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            acc = tl.dot(a_desc.load([row, k0]), w_desc.load([e * N + col, k0]).T, acc)
        offs_m = row + tl.arange(0, BM)
        offs_n = col + tl.arange(0, BN)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))

    return triton, per_expert_gemm


def _triton_persistent_gemm():
    import triton
    import triton.language as tl

    @triton.jit
    def persistent_expert_gemm(
        a_desc, w_desc, out_ptr, rows, N, K, num_experts, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ):  # fmt: skip
        # The same tiles as per_expert_gemm, but PROGRAMS programs loop over them, so the next tile's
        # loads can start while this one's epilogue runs (flattened loop) instead of at a new launch.
        num_m = tl.cdiv(rows, BM)
        per_expert = num_m * tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        for tile in tl.range(
            tl.program_id(0), num_experts * per_expert, PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
        ):
            e = tile // per_expert
            row = e * rows + (tile % per_expert % num_m) * BM
            col = (tile % per_expert // num_m) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                k0 = ki * BK
                acc = tl.dot(a_desc.load([row, k0]), w_desc.load([e * N + col, k0]).T, acc)
            offs_m = row + tl.arange(0, BM)
            offs_n = col + tl.arange(0, BN)
            tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))

    return triton, persistent_expert_gemm


def _descriptor_setup(make_kernel, a: torch.Tensor, w: torch.Tensor, num_experts: int, device: torch.device):
    """``(TensorDescriptor, kernel, rows, K, N, out)`` for a per-expert descriptor GEMM of ``a``
    ([E * rows, K]) by ``w`` ([E * N, K]); None where this Triton has no tensor descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        triton, kernel = make_kernel()
    except ImportError:
        return None
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    n = w.shape[0] // num_experts
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=device)
    return TensorDescriptor, kernel, a.shape[0] // num_experts, a.shape[1], n, out


def triton_ideal_ms(a: torch.Tensor, w: torch.Tensor, num_experts: int, device: torch.device) -> dict | None:
    """Best time of the plain descriptor GEMM over :data:`TRITON_CONFIGS` (None without TMA support)."""
    setup = _descriptor_setup(_triton_gemm, a, w, num_experts, device)
    if setup is None:
        return None
    TensorDescriptor, kernel, rows, k, n, out = setup
    best = None
    for bn, stages, warps in TRITON_CONFIGS:
        if rows % 128 or n % bn:
            continue
        a_desc = TensorDescriptor.from_tensor(a, [128, 64])
        w_desc = TensorDescriptor.from_tensor(w, [bn, 64])
        grid = (num_experts * (rows // 128) * (n // bn),)

        def run(a_desc=a_desc, w_desc=w_desc, grid=grid, bn=bn, stages=stages, warps=warps):
            kernel[grid](a_desc, w_desc, out, rows, n, k, 128, bn, 64, num_stages=stages, num_warps=warps)

        ms = device_ms(run, device)
        if best is None or ms < best["ms"]:
            best = {"ms": ms, "block_n": bn, "num_stages": stages, "num_warps": warps}
    return best


# (BLOCK_N, num_stages, num_warps, programs per SM, flatten) tried for the persistent GEMM.
PERSISTENT_CONFIGS = tuple(itertools.product((128, 256), (3, 4), (4, 8), (1, 2), (False, True)))


def triton_persistent_ms(
    a: torch.Tensor, w: torch.Tensor, num_experts: int, device: torch.device, warp_specialize: bool = False
) -> dict | None:
    """Best time of the persistent descriptor GEMM over :data:`PERSISTENT_CONFIGS` (None without TMA);
    configurations that fail to compile or launch are skipped and counted."""
    setup = _descriptor_setup(_triton_persistent_gemm, a, w, num_experts, device)
    if setup is None:
        return None
    TensorDescriptor, kernel, rows, k, n, out = setup
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ref = None
    best, failed = None, 0
    for bn, stages, warps, per_sm, flatten in PERSISTENT_CONFIGS:
        if rows % 128 or n % bn or (warp_specialize and flatten):
            continue
        a_desc = TensorDescriptor.from_tensor(a, [128, 64])
        w_desc = TensorDescriptor.from_tensor(w, [bn, 64])
        programs = min(sms * per_sm, num_experts * (rows // 128) * (n // bn))

        def run(a_desc=a_desc, w_desc=w_desc, bn=bn, stages=stages, warps=warps, programs=programs, flatten=flatten):
            kernel[(programs,)](
                a_desc, w_desc, out, rows, n, k, num_experts, 128, bn, 64, programs, flatten, warp_specialize,
                num_stages=stages, num_warps=warps,
            )  # fmt: skip

        try:
            run()
            torch.cuda.synchronize()
        except Exception as exc:  # a configuration the compiler or the GPU refuses
            failed += 1
            print(f"  persistent {bn=} {stages=} {warps=} {per_sm=} {flatten=} ws={warp_specialize}: {exc!r:.200}")
            continue
        if ref is None:  # every configuration must compute the same product
            ref = torch.bmm(a.view(num_experts, rows, k), w.view(num_experts, n, k).transpose(1, 2)).view(-1, n)
        err = (out.float() - ref.float()).abs().max().item()
        if err > 0.05 * ref.float().abs().max().item():
            failed += 1
            print(f"  persistent {bn=} {stages=} {warps=} {per_sm=} {flatten=}: wrong result (max error {err:.3g})")
            continue
        ms = device_ms(run, device)
        if best is None or ms < best["ms"]:
            best = {
                "ms": ms, "block_n": bn, "num_stages": stages, "num_warps": warps, "programs_per_sm": per_sm,
                "flatten": flatten, "warp_specialize": warp_specialize,
            }  # fmt: skip
    return best and {**best, "failed_configs": failed}


def mma_rows(counts: list[int], block_m: int = 128, tail_m: int = 64) -> int:
    """Rows the tensor cores multiply for groups of ``counts`` rows: whole ``block_m``-row tiles, an
    expert's last tile shrunk to ``tail_m`` rows where its rows fit (wgmma's smallest height is 64)."""
    total = 0
    for c in counts:
        full, rest = divmod(c, block_m)
        total += full * block_m + (0 if rest == 0 else tail_m if rest <= tail_m else block_m)
    return total


def bench_shape(
    name: str, tokens: int, device: torch.device, ceilings: dict, persistent: bool = False, ws: bool = False
) -> dict:
    from hf_moe_opt.benchmarking.common import LAYER_SHAPES, floor_ms, memory_bandwidth
    from hf_moe_opt.dispatch import make_plan
    from hf_moe_opt.experts.activation import Activation
    from hf_moe_opt.kernels import moe_ffn

    e, d, f, k = LAYER_SHAPES[name]
    rows = tokens * k // e
    bias = k == 2  # nllb-moe-54b's experts have biases, Switch's do not
    g = torch.Generator(device=device).manual_seed(0)
    w1 = torch.randn(e, f, d, device=device, dtype=torch.bfloat16, generator=g) * d**-0.5
    w2 = torch.randn(e, d, f, device=device, dtype=torch.bfloat16, generator=g) * f**-0.5
    b1 = torch.zeros(e, f, device=device, dtype=torch.bfloat16) if bias else None
    b2 = torch.zeros(e, d, device=device, dtype=torch.bfloat16) if bias else None
    xs = torch.randn(e, rows, d, device=device, dtype=torch.bfloat16, generator=g)
    hs = torch.randn(e, rows, f, device=device, dtype=torch.bfloat16, generator=g)
    half_bytes = e * d * f * 2  # one GEMM's weights
    half_flops = 2 * e * rows * d * f
    gemm_floor = 1e3 * max(half_bytes / memory_bandwidth(ceilings), half_flops / ceilings["bf16_flops_per_s"])
    row = {
        "shape": name,
        "tokens": tokens,
        "rows_per_expert": rows,
        "floor_ms": floor_ms(e, d, f, tokens * k, ceilings, bias=bias),
        "gemm_floor_ms": gemm_floor,
        "bmm_gemm1_ms": device_ms(lambda: torch.bmm(xs, w1.transpose(1, 2)), device),
        "bmm_gemm2_ms": device_ms(lambda: torch.bmm(hs, w2.transpose(1, 2)), device),
    }
    for gemm, a, w in (("gemm1", xs, w1), ("gemm2", hs, w2)):
        best = triton_ideal_ms(a.view(e * rows, -1), w.reshape(-1, w.shape[2]), e, device)
        row[f"triton_ideal_{gemm}_ms"] = best and best["ms"]
        row[f"triton_ideal_{gemm}_config"] = best and {key: v for key, v in best.items() if key != "ms"}
        if persistent:
            best = triton_persistent_ms(a.view(e * rows, -1), w.reshape(-1, w.shape[2]), e, device, ws)
            row[f"triton_persistent_{gemm}_ms"] = best and best["ms"]
            row[f"triton_persistent_{gemm}_config"] = best and {key: v for key, v in best.items() if key != "ms"}
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, generator=g)
    relu = Activation("relu", torch.relu)
    gates = torch.full((tokens, k), 1.0 / k, device=device, dtype=torch.bfloat16)
    # Balanced: assignment i to expert i % E, so every group has exactly `rows` rows. Random: k distinct
    # experts per token, uniformly.
    balanced = (torch.arange(tokens * k, device=device) % e).view(tokens, k)
    random = torch.rand(tokens, e, device=device, generator=g).topk(k, dim=-1).indices
    for label, index in (("balanced", balanced), ("random", random)):
        plan = make_plan(index, gates, None, e)
        row[f"ours_{label}_ms"] = device_ms(lambda plan=plan: moe_ffn(x, plan, w1, b1, w2, b2, relu, 1.0), device)
        counts = torch.bincount(index.flatten(), minlength=e)
        row[f"mma_rows_{label}"] = mma_rows(counts.tolist()) / (tokens * k)
        if hasattr(torch, "_grouped_mm"):  # the vendor's grouped GEMM on the same group sizes, rows pre-sorted
            offs = counts.cumsum(0).to(torch.int32)
            a1 = torch.randn(tokens * k, d, device=device, dtype=torch.bfloat16, generator=g)
            a2 = torch.randn(tokens * k, f, device=device, dtype=torch.bfloat16, generator=g)
            for gemm, a, w in (("gemm1", a1, w1), ("gemm2", a2, w2)):
                row[f"grouped_mm_{label}_{gemm}_ms"] = device_ms(
                    lambda a=a, w=w, offs=offs: torch._grouped_mm(a, w.transpose(1, 2), offs=offs), device
                )
    for key in [key for key in row if key.endswith("_ms") and "floor" not in key]:
        floor = row["floor_ms"] if key.startswith("ours") else gemm_floor
        row[key.replace("_ms", "_x_floor")] = row[key] / floor if row[key] else None
    row["bmm_both_x_layer_floor"] = (row["bmm_gemm1_ms"] + row["bmm_gemm2_ms"]) / row["floor_ms"]
    return row


# (label, keys averaged) for the plot: per-GEMM ratios average GEMM1 and GEMM2.
PLOT_SERIES = (
    ("bmm, equal groups", ("bmm_gemm1_x_floor", "bmm_gemm2_x_floor")),
    ("grouped_mm, equal groups", ("grouped_mm_balanced_gemm1_x_floor", "grouped_mm_balanced_gemm2_x_floor")),
    ("grouped_mm, random routing", ("grouped_mm_random_gemm1_x_floor", "grouped_mm_random_gemm2_x_floor")),
    ("moe_ffn, equal groups", ("ours_balanced_x_floor",)),
    ("moe_ffn, random routing", ("ours_random_x_floor",)),
)


def plot(result: dict, path: Path) -> None:
    """Each series' time over its floor per shape and token count, the 1.3x target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(rows) + 2), 4.8))
    width = 0.8 / len(PLOT_SERIES)
    for i, (label, keys) in enumerate(PLOT_SERIES):
        got = [[r.get(key) for key in keys] for r in rows]
        ys = [sum(v) / len(v) if all(v) else float("nan") for v in got]
        ax.bar([j + (i - (len(PLOT_SERIES) - 1) / 2) * width for j in range(len(rows))], ys, width, label=label)
    ax.axhline(1.3, color="k", linestyle="--", linewidth=1, label="1.3x target")
    ax.set_xticks(range(len(rows)), [f"{r['shape']}\n{r['tokens']} tok" for r in rows], fontsize=8)
    ax.set_ylabel("time / floor (per GEMM, or whole layer for moe_ffn)")
    ax.set_ylim(bottom=1.0)
    env = result.get("environment", {})
    where = f"{env.get('device', '')}, torch {env.get('torch', '')}, triton {env.get('triton', '')}"
    ax.set_title(f"Expert GEMMs against the floor: {where}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from hf_moe_opt.benchmarking.common import LAYER_SHAPES, environment, measure_ceilings, print_ceilings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=list(LAYER_SHAPES), default=list(LAYER_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--out", type=json_out, default="benchmarks/results/ideal_gemm.json")
    p.add_argument("--persistent", action="store_true", help="also time a persistent descriptor GEMM (tile loop)")
    p.add_argument("--warp-specialize", action="store_true", help="the persistent GEMM with warp specialisation")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ideal_gemm.py needs a CUDA GPU")
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    ceilings = measure_ceilings(device)
    print_ceilings(ceilings)
    result = {"environment": environment(), "command": " ".join(sys.argv), "ceilings": ceilings, "rows": []}
    for name, tokens in itertools.product(args.shapes, args.tokens):
        row = bench_shape(name, tokens, device, ceilings, args.persistent, args.warp_specialize)
        result["rows"].append(row)
        parts = ", ".join(f"{key[:-8]} {row[key]:.2f}x" for key in row if key.endswith("_x_floor") and row[key])
        print(f"{name} {tokens} tokens ({row['rows_per_expert']} rows/expert): floor {row['floor_ms']:.3f} ms "
              f"(each GEMM {row['gemm_floor_ms']:.3f}); {parts}; MMA rows per row: balanced "
              f"{row['mma_rows_balanced']:.3f}, random {row['mma_rows_random']:.3f}", flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
