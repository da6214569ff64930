"""Where an optimized encoder forward spends its GPU time (torch.profiler, one table per model).

    python benchmarks/profile_encoder.py --model switch-base-128 --batch 128 --seq 128

Real config, random bf16 weights, ``hf_moe_opt.optimize`` applied; prints the kernels with the most
CUDA time over a few forwards (per forward), and the share of the time inside the MoE layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    import hf_moe_opt
    from hf_moe_opt.benchmarking.model import random_ids, random_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="switch-base-128")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device("cuda")
    model = random_model(args.model, device)
    hf_moe_opt.optimize(model)
    ids = random_ids(model, args.batch, args.seq, device, torch.Generator().manual_seed(0))
    encoder = model.get_encoder()
    moe_layers = [m for m in model.modules() if isinstance(m, hf_moe_opt.layer.OptimizedMoE)]
    for layer in moe_layers:
        forward = layer.forward

        def timed(*a, _forward=forward, **k):
            with record_function("moe_layer"):
                return _forward(*a, **k)

        layer.forward = timed
    with torch.no_grad():
        for _ in range(2):
            encoder(input_ids=ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.repeats):
                encoder(input_ids=ids)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90)
    print(f"{args.model} encoder {args.batch}x{args.seq}, {args.repeats} forwards, {len(moe_layers)} MoE layers")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
