"""Kernel-by-kernel GPU time of one MoE layer call, eager and CUDA-graph replayed (torch.profiler).

    python benchmarks/profile_layer.py --shape switch-base-128 --tokens 1 64 --backend triton

Shows where a small-batch layer call spends its time: one line per CUDA kernel with its duration,
then the total, beside the floor from the same run's measured ceilings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def profile_kernels(fn, repeats: int = 10) -> list[tuple[str, float]]:
    """``[(kernel name, mean us per call)]`` of the CUDA kernels ``fn`` launches, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)
    return [(name, sum(times) / repeats) for name, times in kernels.items()]


def main(argv=None) -> int:
    from hf_moe_opt.benchmarking.common import LAYER_SHAPES, floor_ms, measure_ceilings
    from hf_moe_opt.benchmarking.layer import build_block, graphed
    from hf_moe_opt.patches import NllbMoePatch, SwitchTransformersPatch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="switch-base-128", choices=list(LAYER_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64])
    p.add_argument("--backend", default="triton", choices=["torch", "triton"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    e, d, f, k = LAYER_SHAPES[args.shape]
    block, cfg = build_block(args.shape, device)
    patch = SwitchTransformersPatch() if k == 1 else NllbMoePatch()
    layer = patch.build(block, cfg, capacity="model", backend=args.backend)
    with torch.no_grad():
        for n in args.tokens:
            x = torch.randn(1, n, d, device=device, dtype=torch.bfloat16)
            active = min(e, n * k)
            floor_us = floor_ms(active, d, f, n * k, ceilings) * 1e3
            print(f"\n{args.shape} tokens={n} backend={args.backend} floor<={floor_us:.1f} us")
            for label, fn in (("eager", lambda x=x: layer(x)), ("graph", graphed(layer, x))):
                rows = profile_kernels(fn)
                total = sum(us for _, us in rows)
                print(f"  {label}: {len(rows)} kernels, {total:.1f} us of kernel time per call")
                for name, us in rows:
                    print(f"    {us:8.1f} us  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
