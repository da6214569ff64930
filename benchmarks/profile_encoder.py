"""Where an optimized encoder forward spends its GPU time (torch.profiler, one table per model).

    python benchmarks/profile_encoder.py --model switch-base-128 --batch 128 --seq 128

Real config, random bf16 weights. Prints the forward's GPU time and the part spent inside the MoE
layers (CUDA events around each layer; the GPU must be the bottleneck for the split to hold), with
the model's capacity and without, then the kernels with the most CUDA time (optimized, capacity as
the model's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _split_times(model, encoder, ids, repeats: int) -> tuple[float, float]:
    """Median GPU time of one encoder forward and of its MoE layers together (CUDA events), ms."""
    import hf_moe_opt

    layers = [m for _, m in hf_moe_opt.optimized_layers(model)]
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def before(module, args):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        marks.append((start, None))

    def after(module, args, out):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks[-1] = (marks[-1][0], end)

    hooks = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    totals, moes = [], []
    with torch.no_grad():
        for i in range(repeats + 2):
            marks.clear()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            encoder(input_ids=ids)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:  # warm-up
                totals.append(start.elapsed_time(end))
                moes.append(sum(a.elapsed_time(b) for a, b in marks))
    for h in hooks:
        h.remove()
    return statistics.median(totals), statistics.median(moes)


def main(argv=None) -> int:
    import hf_moe_opt
    from hf_moe_opt.benchmarking.model import random_ids, random_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="switch-base-128")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument(
        "--fuse-dense", action="store_true", help="optimize(..., fuse_dense=True): fused attention and norms"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    model = random_model(args.model, device)
    ids = random_ids(model, args.batch, args.seq, device, torch.Generator().manual_seed(0))
    encoder = model.get_encoder()
    fused = ", fuse_dense" if args.fuse_dense else ""
    print(f"{args.model} encoder {args.batch}x{args.seq}{fused}, medians of {args.repeats} forwards")
    for capacity in ("model", "none"):
        hf_moe_opt.optimize(model, capacity=capacity, fuse_dense=args.fuse_dense)
        total, moe = _split_times(model, encoder, ids, args.repeats)
        share = f"MoE layers {moe:.3f} ms ({moe / total:.0%}), rest {total - moe:.3f} ms"
        print(f"  capacity={capacity}: forward {total:.3f} ms, {share}")
        hf_moe_opt.restore(model)
    hf_moe_opt.optimize(model, fuse_dense=args.fuse_dense)
    with torch.no_grad():
        for _ in range(2):
            encoder(input_ids=ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.repeats):
                encoder(input_ids=ids)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
