"""Host time of a cached decode step vs a resident one (cProfile over the MoE-only stack).

    python benchmarks/profile_cache_step.py --family switch --batch 1 --fraction 0.5 --policy adaptive

Decode steps of a MoE-only stack are bound by the host (Python and kernel launches), so the
cache's extra cost per step is host time: the read of the router's choices, the policy, the slot
table and the copies' launches. This runs ``bench_cache.py``'s stack and token stream fully resident
and cached, reports the wall time per step of each (after a warm-up) and the functions with the most
own time under cProfile (which slows Python down; compare the two lists, not their absolute times).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    import bench_cache

    import hf_moe_opt
    from hf_moe_opt.cache import DEFAULT_POLICY, POLICY_NAMES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["switch", "nllb"], default="switch")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--prefetch", action="store_true", help="also profile the cached stack with cache_prefetch=True")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("profile_cache_step.py needs CUDA (--smoke runs on the CPU)")
        return 0
    shape = bench_cache.SMOKE_SHAPES[args.family] if args.smoke else None
    torch.manual_seed(0)
    with torch.device(device):
        model = bench_cache.MoEStack(args.family, args.layers, shape).to(torch.bfloat16).eval()
    stream = bench_cache.token_stream(model.d_model, args.batch, args.steps, device, seed=args.batch)
    settings = [("resident", {}), (f"{args.fraction:g} resident, {args.policy}", {"expert_cache": args.fraction})]
    if args.prefetch:
        label = f"{args.fraction:g} resident, {args.policy}, look-ahead"
        settings.append((label, {"expert_cache": args.fraction, "cache_prefetch": True}))
    for label, kwargs in settings:
        if kwargs:
            kwargs["cache_policy"] = args.policy
        bench_cache._optimize(model, capacity="none", **kwargs)
        bench_cache.decode_ms(model, stream, 0)  # warm-up: kernels compiled, slots filled
        ms = bench_cache.decode_ms(model, stream, 0)
        profiler = cProfile.Profile()
        with torch.no_grad():
            profiler.enable()
            t0 = time.perf_counter()
            for x in stream:
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            profiled_ms = (time.perf_counter() - t0) * 1e3 / len(stream)
            profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
        stats.print_stats(args.top)
        print(f"== {args.family} x{args.layers} layers, batch {args.batch}, {label}: {ms:.3f} ms per step "
              f"({ms / args.layers * 1e3:.0f} us per layer; {profiled_ms:.3f} ms under cProfile)")  # fmt: skip
        lines = text.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print("\n".join(line for line in lines[start:] if line.strip()))
        hf_moe_opt.restore(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
