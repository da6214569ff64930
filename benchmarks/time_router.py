"""Router timing, graph-replayed: torch's float32 projection + routing vs the fused Triton router, with
a tile sweep of the large-batch kernel (python benchmarks/time_router.py). Times are medians over
graph replays of 20 calls each.

Each row prints the floor beside it: max(bytes the fused router must move / copy bandwidth, its FLOPs /
bf16 matmul rate), both rates measured at the start of the run. Bytes: the tokens and the weight read
once, the float32 logits, expert ids and gates written. fp32 router weights cannot use the bf16 rate,
so for them the FLOP term is optimistic.

``--against FILE``: also time another version of ``hf_moe_opt/kernels/router.py`` (e.g. the file at an
earlier commit, ``git show REV:hf_moe_opt/kernels/router.py > old.py``) side by side, decode batches
included, and print the ratio; ``--no-sweep`` skips the tile sweep.
"""

# The timed closures run inside the loop iteration that defines them.
# ruff: noqa: B023, B008
import argparse
import importlib.util
import statistics
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("time_router.py needs a CUDA GPU")
import torch.nn.functional as F

sys.path.insert(0, ".")
import hf_moe_opt.kernels.router as R
from hf_moe_opt.benchmarking.common import measure_ceilings, memory_bandwidth, print_ceilings
from hf_moe_opt.routing import nllb_route, switch_route


def gpu_us(fn, reps=20, iters=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


CASES = [
    ("switch-base-128, fp32 W", 128, 768, torch.float32),
    ("switch-base-128, bf16 W", 128, 768, torch.bfloat16),
    ("nllb-moe-54b, bf16 W", 128, 2048, torch.bfloat16),
    ("nllb-moe-54b, fp32 W", 128, 2048, torch.float32),
]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--against", help="another router.py to time beside this one")
parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
args = parser.parse_args()
other = None
if args.against:
    # A name inside the package: its relative imports resolve.
    spec = importlib.util.spec_from_file_location("hf_moe_opt.kernels._router_against", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    print(f"against: {args.against}", flush=True)

ceilings = measure_ceilings(torch.device("cuda"))
print_ceilings(ceilings, torch.device("cuda"))


def floor_us(x, w, outputs) -> float:
    """max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) of one fused router call, in us."""
    moved = sum(t.numel() * t.element_size() for t in (x, w, *outputs))
    flops = 2 * x.shape[0] * w.shape[0] * w.shape[1]
    return 1e6 * max(moved / memory_bandwidth(ceilings), flops / ceilings["bf16_flops_per_s"])


default_config = R.large_batch_config
for name, E, D, wdt in CASES:
    mode = "switch" if name.startswith("switch") else "nllb"
    for N in (1, 64, 512, 4096, 16384) if other is not None else (512, 4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
        w = (torch.randn(E, D, device="cuda", generator=g) / D**0.5).to(wdt)
        w32 = w.float()

        def old():
            logits = F.linear(x.to(torch.float32), w32)
            return (
                switch_route(logits.view(1, N, E), x.dtype, None)
                if mode == "switch"
                else nllb_route(logits, x.dtype, capacity=None)
            )

        def new():
            return R.fused_router(x, w, None, mode=mode, logits_dtype=torch.float32, gates_dtype=x.dtype)

        R.large_batch_config = default_config
        ref, (logits, index, gates) = old(), new()
        agree = (index == ref.expert_index).all(1).float().mean().item()
        err = (logits - F.linear(x.float(), w32)).abs().max().item()
        t_old, t_new = gpu_us(old), gpu_us(new)
        cfg = default_config(N, E, D, x.device, max(x.element_size(), w.element_size()), wdt == torch.float32)
        floor = floor_us(x, w, (logits, index, gates))
        print(
            f"{name:26s} N={N:5d} torch {t_old:7.1f} us fused {t_new:6.1f} us"
            f" floor {floor:5.1f} us ({t_new / floor:4.1f}x) {tuple(cfg)}",
            f"same choice {agree:.4f} max|dlogit| {err:.2e}",
            flush=True,
        )
        if other is not None:

            def against():
                return other.fused_router(x, w, None, mode=mode, logits_dtype=torch.float32, gates_dtype=x.dtype)

            assert torch.equal(against()[1], index)
            times = [(gpu_us(new), gpu_us(against)) for _ in range(3)]  # interleaved
            mine, theirs = sorted(t for t, _ in times)[1], sorted(t for _, t in times)[1]
            print(f"    this {mine:6.1f} us  against {theirs:6.1f} us  ratio {mine / theirs:.3f}", flush=True)
        if N <= 512 or args.no_sweep:
            continue
        sweep = []
        for bt in (16, 32, 64, 128):
            for bd in (32, 64):
                for nw in (4, 8):
                    if bt * E > 16384:
                        continue
                    R.large_batch_config = lambda *a, c=R.LargeBatchConfig(bt, bd, nw): c
                    try:
                        sweep.append((gpu_us(new), (bt, bd, nw)))
                    except Exception as exc:
                        print("   ", (bt, bd, nw), type(exc).__name__)
        R.large_batch_config = default_config
        print("    best tiles:", ", ".join(f"{c} {t:.1f} us" for t, c in sorted(sweep)[:5]), flush=True)
