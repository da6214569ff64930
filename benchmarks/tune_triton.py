"""Tune the Triton MoE kernels' launch configs on this GPU and write the config table.

For every ``(E, D, F, k)`` shape and token count it times each candidate config of the two kernels
(gather -> GEMM1 -> activation, GEMM2 -> weighted scatter) separately on a random uniform top-k
routing, keeps the fastest, and merges the result into
``hf_moe_opt/kernels/configs/<GPU name>.json`` (or ``--out``), the file ``moe_ffn`` reads.

    python benchmarks/tune_triton.py --shape 128,768,3072,1 --shape 128,2048,8192,2 \\
        --tokens 1 16 64 256 1024 4096 16384

Needs a CUDA device; on CPU it exits with a message (the interpreter is far too slow to time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from hf_moe_opt.benchmarking.common import json_out  # noqa: E402

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_TORCH_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_new": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be E,D,F,k")
    return parts[0], parts[1], parts[2], parts[3]


def _candidates(
    rows_per_expert: float,
    quick: bool,
    gated: bool,
    split: bool = False,
    wide: bool = False,
    block_ms: tuple[int, ...] | None = None,
    warps_only: tuple[int, ...] | None = None,
    tma: str = "off",
    group_ms: tuple[int, ...] = (8,),
    elem_bytes: int = 2,
    tail_ms: tuple[int, ...] = (0,),
    persistents: tuple[int, ...] = (0,),
    flattens: tuple[int, ...] = (1,),
):
    from hf_moe_opt.kernels import KernelConfig

    # Tiles taller than twice the average group waste most of their rows; much shorter ones re-read
    # the weights too often.
    max_m = 16
    while max_m < 128 and max_m < 2 * rows_per_expert:
        max_m *= 2
    block_m = [m for m in (16, 32, 64, 128) if max_m // 4 <= m <= max_m]
    if block_ms and 256 in block_ms:
        # On request only: one 256-row tile for an expert of 129-256 rows (with tail_m=128, a 128-row
        # tile for up to 128), instead of a full tile and a nearly empty one.
        block_m.append(256)
    small = max_m <= 32  # weight-read bound: many narrow programs, deep K tiles
    if quick:
        block_n, block_k, warps, stages = (32, 64, 128), (64,), (4,), (3, 4)
    elif small:
        block_n, block_k, warps, stages = (16, 32, 64), (128, 256), (4,), (3, 4)
    else:
        block_m = [m for m in block_m if m >= 64] or block_m
        block_n, block_k, warps, stages = (64, 128, 256), (64,), (4, 8), (3, 4)
        if wide:
            block_k, stages = (32, 64, 128), (3, 4, 5)
    block_m = [m for m in block_m if block_ms is None or m in block_ms]
    warps = [w for w in warps if warps_only is None or w in warps_only]
    for m, n, k, w, s in itertools.product(block_m, block_n, block_k, warps, stages):
        if m * n >= 128 * 256 and w == 4 or m * n > 128 * 256:
            continue  # a 4-warp program cannot hold that accumulator in registers, an 8-warp one no more
        tiles = m + (2 * n if gated else n)
        if tiles * k * 2 * s > 200 * 1024:
            continue  # more shared memory than an H100/H200 SM has
        # TMA tiles: K tiles of at most one 128-byte swizzle span (see kernels.moe_ffn._tma_matrix).
        # GEMM2 (split) also tries TMA for W2 alone, its rows of h by pointer (tma=2).
        modes = {"off": (0,), "both": (0, 1), "only": (1,)}[tma]
        if split and tma != "off":
            modes = (*modes, 2)
        tma_states = modes if k * elem_bytes <= 128 else (0,)
        # Split-K (GEMM2 only) spreads a few rows' weight reads over more programs.
        splits = (1, 2, 4, 8) if split and small and not quick else (1,)
        # Short last row tiles of an expert as tail_m-row tiles (0: off); only heights below BLOCK_M.
        tails = [tail for tail in tail_ms if tail == 0 or 16 <= tail < m]
        # Persistent launches (programs per SM looping over the tiles), without split-K.
        loops = [(p, f) for p in persistents for f in (flattens if p else (1,))]
        for split_k, t, g, tail, (persist, flat) in itertools.product(splits, tma_states, group_ms, tails, loops):
            if persist and split_k > 1:
                continue
            yield KernelConfig(
                block_m=m,
                block_n=n,
                block_k=k,
                num_warps=w,
                num_stages=s,
                split_k=split_k,
                group_m=g,
                tma=t,
                tail_m=tail,
                persistent=persist,
                flatten=flat,
            )


# Device time of CUDA-graph replays by default: eager timing of a few-microsecond kernel measures the
# host's launch overhead (tens of microseconds per Triton launch), which would steer small batches
# away from configs with a second launch (split-K) for the wrong reason.
GRAPH_TIMING = True


def _time(fn, warmup_ms: int, rep_ms: int) -> float:
    import triton

    if GRAPH_TIMING:
        fn()  # compile and allocate outside the capture
        torch.cuda.synchronize()
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


_TMA_NAMES = {0: "without TMA", 1: "with TMA", 2: "with TMA for the weights only"}
# Knobs with an A/B line (best time per value, side by side in one run): attribute, how a value reads.
_AB_KNOBS = (
    ("tma", _TMA_NAMES.__getitem__),
    ("tail_m", lambda v: f"tail_m={v}"),
    ("block_m", lambda v: f"block_m={v}"),
    ("persistent", lambda v: f"persistent={v}"),
    ("flatten", lambda v: f"flatten={v}"),
)


def _best(label: str, fn_for, candidates, warmup_ms: int, rep_ms: int):
    best, best_ms = None, float("inf")
    by_knob: dict[str, dict[int, float]] = {knob: {} for knob, _ in _AB_KNOBS}
    for cfg in candidates:
        fn = fn_for(cfg)
        try:
            fn()  # compile; some configs exceed shared memory or registers
            torch.cuda.synchronize()
        except Exception as err:  # triton raises several error types for configs that do not fit
            print(f"  {label} {cfg}: skipped ({type(err).__name__})")
            continue
        ms = _time(fn, warmup_ms, rep_ms)
        for knob, times in by_knob.items():
            value = getattr(cfg, knob)
            times[value] = min(ms, times.get(value, float("inf")))
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no {label} config compiled")
    for knob, name in _AB_KNOBS:
        times = by_knob[knob]
        if len(times) > 1:
            print(f"  {label}: " + ", ".join(f"best {name(v)} {ms:.4f} ms" for v, ms in sorted(times.items())))
    return best, best_ms


def _filters(args, dtype: torch.dtype) -> dict:
    return {
        "block_ms": tuple(args.block_m) if args.block_m else None,
        "warps_only": tuple(args.num_warps) if args.num_warps else None,
        "tma": args.tma,
        "group_ms": tuple(args.group_m),
        "tail_ms": tuple(args.tail_m),
        "persistents": tuple(args.persistent),
        "flattens": tuple(args.flatten),
        "elem_bytes": torch.empty((), dtype=dtype).element_size(),
    }


class _Problem:
    """Inputs of one (shape, tokens) point: random uniform top-k routing, weights, output buffers."""

    def __init__(self, shape, tokens: int, dtype: torch.dtype, activation: str, device: str = "cuda") -> None:
        from hf_moe_opt.dispatch import make_plan
        from hf_moe_opt.experts.activation import Activation, glu_activation
        from hf_moe_opt.kernels.moe_ffn import KernelActivation

        num_experts, hidden, ffn, top_k = shape
        dev = torch.device(device)
        gen = torch.Generator(device=dev).manual_seed(0)
        self.x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen)
        self.gated = activation.startswith("glu_")
        w1_rows = 2 * ffn if self.gated else ffn
        self.w1 = torch.randn(num_experts, w1_rows, hidden, device=dev, dtype=dtype, generator=gen) * hidden**-0.5
        self.w2 = torch.randn(num_experts, hidden, ffn, device=dev, dtype=dtype, generator=gen) * ffn**-0.5
        index = torch.rand(tokens, num_experts, device=dev, generator=gen).topk(top_k, dim=1).indices
        gates = torch.rand(tokens, top_k, device=dev, generator=gen)
        keep = torch.ones(tokens, top_k, dtype=torch.bool, device=dev)
        self.plan = make_plan(index, gates, keep, num_experts)
        base = activation.removeprefix("glu_")
        fn = _TORCH_ACTIVATIONS[base]
        self.act = glu_activation(base, fn) if self.gated else Activation(base, fn)
        self.kernel_act = KernelActivation.of(self.act, ffn)
        self.h = torch.empty(self.plan.num_rows, ffn, device=dev, dtype=dtype)
        self.dst = torch.empty(tokens * top_k, hidden, device=dev, dtype=dtype)
        self.rows_per_expert = tokens * top_k / num_experts

    def gemm1(self, cfg):
        from hf_moe_opt.kernels import gather_gemm_act

        return lambda: gather_gemm_act(self.x, self.plan, self.w1, None, self.kernel_act, self.h, cfg)

    def gemm2(self, cfg):
        from hf_moe_opt.kernels import gemm_scatter

        return lambda: gemm_scatter(self.h, self.plan, self.w2, None, 1.0, self.dst, cfg)


def _compile_worker(shape, tokens, dtype, activation, gemm1_cfgs, gemm2_cfgs) -> int:
    """Compile (launch once) every config given; the kernels land in triton's on-disk cache."""
    problem = _Problem(shape, tokens, dtype, activation)
    done = 0
    for make, cfgs in ((problem.gemm1, gemm1_cfgs), (problem.gemm2, gemm2_cfgs)):
        for cfg in cfgs:
            try:
                make(cfg)()
                done += 1
            except Exception:  # configs that do not fit are skipped again, with a message, when timed
                pass
    torch.cuda.synchronize()
    return done


def _precompile(shape, tokens, dtype, activation, gemm1_cfgs, gemm2_cfgs, workers: int) -> None:
    """Compile the candidates in ``workers`` processes at once: compiling, not timing, is most of a
    tuning run, and the timing process then loads every kernel from triton's cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Every worker holds its own copy of the problem: no more workers than the free GPU memory holds
    # (nllb-moe-54b's 8.6 GB of experts in 14 processes ran out of memory).
    num_experts, hidden, ffn, top_k = shape
    w1_rows = 2 * ffn if activation.startswith("glu_") else ffn
    elem = torch.empty((), dtype=dtype).element_size()
    problem_bytes = elem * (num_experts * (w1_rows + ffn) * hidden + tokens * (hidden + top_k * (ffn + hidden)))
    free, _ = torch.cuda.mem_get_info()
    fits = max(1, int(0.8 * free // max(problem_bytes, 1)))  # the timing process's copy is already allocated
    if fits < workers:
        print(f"  precompiling in {fits} processes, not {workers}: each needs {problem_bytes / 2**30:.1f} GiB")
        workers = fits
    jobs = [(list(gemm1_cfgs[i::workers]), list(gemm2_cfgs[i::workers])) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_worker, shape, tokens, dtype, activation, g1, g2) for g1, g2 in jobs]
        compiled = sum(f.result() for f in futures)
    print(f"  precompiled {compiled} of {len(gemm1_cfgs) + len(gemm2_cfgs)} configs in {workers} processes")


def tune_shape(
    shape, tokens: int, dtype: torch.dtype, activation: str, args, device: str = "cuda", incumbent: dict | None = None
) -> dict:
    """The best entry for one point. ``incumbent``, the table's entry for it, is timed in this run too
    and kept when faster: a sweep over fewer or other candidates never makes the table slower."""
    from hf_moe_opt.experts.torch_backend import torch_moe_ffn
    from hf_moe_opt.kernels import KernelConfig, moe_ffn_with_configs

    num_experts, hidden, ffn, top_k = shape
    p = _Problem(shape, tokens, dtype, activation, device)
    x, plan, w1, w2, act = p.x, p.plan, p.w1, p.w2, p.act
    filters = _filters(args, dtype)
    cands1 = list(_candidates(p.rows_per_expert, args.quick, p.gated, wide=args.wide, **filters))
    cands2 = list(_candidates(p.rows_per_expert, args.quick, False, split=True, wide=args.wide, **filters))
    if args.precompile > 1:
        _precompile(shape, tokens, dtype, activation, cands1, cands2, args.precompile)
    g1, ms1 = _best("gemm1", p.gemm1, cands1, args.warmup_ms, args.rep_ms)
    g2, ms2 = _best("gemm2", p.gemm2, cands2, args.warmup_ms, args.rep_ms)
    total = _time(
        lambda: moe_ffn_with_configs(x, plan, w1, None, w2, None, act, 1.0, g1, g2),
        args.warmup_ms,
        args.rep_ms,
    )
    ref_ms = _time(lambda: torch_moe_ffn(x, plan, w1, None, w2, None, act), args.warmup_ms, args.rep_ms)
    print(
        f"E={num_experts} D={hidden} F={ffn} k={top_k} tokens={tokens}: gemm1 {ms1:.4f} ms {g1}, "
        f"gemm2 {ms2:.4f} ms {g2}; moe_ffn {total:.4f} ms, torch backend {ref_ms:.4f} ms"
    )
    entry = {
        "tokens": tokens,
        "gemm1": g1.to_dict(),
        "gemm2": g2.to_dict(),
        "timing": "graph" if GRAPH_TIMING else "eager",
    }
    if incumbent is not None:
        old1, old2 = (KernelConfig.from_dict(incumbent[g]) for g in ("gemm1", "gemm2"))
        old_ms = _time(
            lambda: moe_ffn_with_configs(x, plan, w1, None, w2, None, act, 1.0, old1, old2),
            args.warmup_ms,
            args.rep_ms,
        )
        keep = old_ms <= total
        print(f"  table's entry {old_ms:.4f} ms, new {total:.4f} ms: {'kept' if keep else 'replaced'}")
        if keep:
            entry = {**incumbent, "timing": entry["timing"]}
            total = old_ms
    return {**entry, "ms": round(total, 5), "torch_ms": round(ref_ms, 5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_parse_shape, action="append", help="E,D,F,k (repeatable)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--activation",
        default="relu",
        choices=sorted(_TORCH_ACTIVATIONS) + [f"glu_{a}" for a in sorted(_TORCH_ACTIVATIONS)],
        help="the experts' activation; glu_* tunes gated experts (W1 holds gate and up)",
    )
    parser.add_argument("--out", type=json_out, help="JSON file to write (default: the package's table for this GPU)")
    parser.add_argument("--quick", action="store_true", help="a small candidate set")
    parser.add_argument("--wide", action="store_true", help="more K tiles and pipeline depths for large batches")
    parser.add_argument("--block-m", type=int, nargs="+", help="only these BLOCK_M candidates")
    parser.add_argument("--num-warps", type=int, nargs="+", help="only these num_warps candidates")
    parser.add_argument(
        "--tma",
        choices=["off", "both", "only"],
        default="both",
        help="TMA tile loads: try each candidate without them, with and without, or only with them",
    )
    parser.add_argument("--group-m", type=int, nargs="+", default=[8], help="GROUP_M values to try")
    parser.add_argument(
        "--tail-m",
        type=int,
        nargs="+",
        default=[0],
        help="tail tile heights to try (0: off; e.g. 0 64 times each candidate without and with 64-row tail "
        "tiles; heights not below a candidate's BLOCK_M are skipped)",
    )
    parser.add_argument(
        "--persistent",
        type=int,
        nargs="+",
        default=[0],
        help="persistent launches to try, as programs per SM (0: one program per tile; e.g. 0 1 2)",
    )
    parser.add_argument(
        "--flatten", type=int, nargs="+", choices=[0, 1], default=[1], help="persistent loops flattened (1) or not"
    )
    parser.add_argument(
        "--precompile", type=int, default=8, help="processes compiling the candidates before timing (1: none)"
    )
    parser.add_argument(
        "--replace", action="store_true", help="write the new best even where the table's entry is faster in this run"
    )
    parser.add_argument("--eager-timing", action="store_true", help="time eager launches instead of CUDA-graph replays")
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    args = parser.parse_args(argv)
    global GRAPH_TIMING
    GRAPH_TIMING = not args.eager_timing

    if not torch.cuda.is_available():
        print("tune_triton.py needs a CUDA GPU: it times compiled Triton kernels. Nothing was written.")
        return 1
    try:
        import triton  # noqa: F401
    except ImportError:
        print("tune_triton.py needs the triton package (pip install triton).")
        return 1
    from hf_moe_opt.kernels import kernels_interpreted
    from hf_moe_opt.kernels.launch_config import CONFIG_DIR, clear_cache, device_file_stem, shape_key

    if kernels_interpreted():
        print("TRITON_INTERPRET=1 is set: unset it to time compiled kernels.")
        return 1

    shapes = args.shape or [(128, 768, 3072, 1), (128, 2048, 8192, 2)]
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    out = args.out or CONFIG_DIR / f"{device_file_stem(name)}.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    table["device"] = name
    table.setdefault("shapes", {})
    for shape in shapes:
        key = shape_key(*shape)
        old = {e["tokens"]: e for e in table["shapes"].get(key, [])}
        for t in sorted(set(args.tokens)):
            entry = tune_shape(shape, t, dtype, args.activation, args, incumbent=None if args.replace else old.get(t))
            old[t] = entry  # entries at token counts not tuned now are kept
            table["shapes"][key] = sorted(old.values(), key=lambda e: e["tokens"])
            # The first tuned shape also serves shapes this GPU has no entry for.
            table.setdefault("default", table["shapes"][key])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=2) + "\n")  # after every entry: a long run keeps its work
        print(f"wrote {out}")
    clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
