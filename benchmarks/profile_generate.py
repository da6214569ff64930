"""Where a graphed sequence-to-sequence ``generate`` call spends its time (host and device).

    PYTHONPATH=$PWD python benchmarks/profile_generate.py --model switch-base-128 --batch 1

Real config, random bf16 weights, ``optimize(model, fuse_dense=True, cuda_graphs=("encoder", "step"))``,
two warm-up calls (they capture), then one greedy ``generate`` of ``--new`` tokens from a
``batch x --prompt`` prompt: its wall time (CUDA events), the GPU time of its kernels and their count
(torch.profiler), and the host's Python time by function (cProfile, which slows the host down; read
the shares, not the absolute times). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import hf_moe_opt
from hf_moe_opt.benchmarking.common import environment
from hf_moe_opt.benchmarking.model import generated, random_ids, random_model
from hf_moe_opt.timing import median_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="switch-base-128")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--top", type=int, default=30, help="functions listed by cumulative and by own time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this profile needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = environment()
    print(f"# {env['device']}: torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}")
    model = random_model(args.model, device)
    hf_moe_opt.optimize(model, fuse_dense=True, cuda_graphs=("encoder", "step"))
    ids = random_ids(model, args.batch, args.prompt, device, torch.Generator().manual_seed(0))
    with torch.no_grad():
        wall = median_ms(lambda: generated(model, ids, args.new), device, repeats=5, warmup=2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generated(model, ids, args.new)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(getattr(e, "device_time_total", 0.0) for e in kernels) / 1e3
        profiler = cProfile.Profile()
        profiler.enable()
        generated(model, ids, args.new)
        torch.cuda.synchronize()
        profiler.disable()
    print(f"== {args.model} batch {args.batch}, {args.prompt}-token prompt, {args.new} new tokens: {wall:.2f} ms "
          f"per generate; GPU kernels {gpu_ms:.2f} ms ({len(kernels)} kernels)")  # fmt: skip
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        print(f"-- host, by {order} time (cProfile)")
        print("\n".join(lines[start:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
