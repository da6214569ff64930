"""Sweep of the plan-free decode kernels' block knobs against the plan path, graph-replayed, on one GPU
(python benchmarks/sweep_gemv.py OUT.json).

The floor of each row counts the experts the batch's routing really chooses (two tokens may share
one), with each family's expert matrices: two for Switch / NLLB-MoE (biases for NLLB), three for the
GLU families.
"""

# The timed closures run inside the loop iteration that defines them.
# ruff: noqa: B023, B008
import itertools
import json
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("sweep_gemv.py needs a CUDA GPU")

sys.path.insert(0, ".")
from hf_moe_opt.benchmarking import families
from hf_moe_opt.benchmarking.common import LAYER_SHAPES, environment, floor_ms, measure_ceilings, print_ceilings
from hf_moe_opt.benchmarking.layer import build_block, graphed
from hf_moe_opt.kernels import gemv
from hf_moe_opt.patches import NllbMoePatch, SwitchTransformersPatch, find_patch
from hf_moe_opt.timing import median_ms

dev = torch.device("cuda")
ceil = measure_ceilings(dev)
print_ceilings(ceil, dev)
res = []
VARIANTS = list(itertools.product((16384, 65536, 1 << 40), (8192, 16384), (1, 3)))


def blocks():
    """(name, optimized layer, d_model, floor in us of a [1, n, d_model] input) per shape."""
    for name in ["switch-base-128", "switch-large-128", "nllb-moe-54b"]:
        _, d, f, k = LAYER_SHAPES[name]
        block, cfg = build_block(name, dev)
        patch = SwitchTransformersPatch() if k == 1 else NllbMoePatch()

        def floor_us(x, block=block, d=d, f=f, k=k):
            logits = x.float().reshape(-1, d) @ block.router.classifier.weight.float().T
            active = int(torch.unique(logits.topk(k, dim=-1).indices).numel())
            return floor_ms(active, d, f, x.shape[1] * k, ceil, bias=k == 2) * 1e3

        yield name, patch.build(block, cfg, capacity="model", backend="triton"), d, floor_us
    for name in ["qwen3-30b-a3b", "mixtral-8x7b"]:
        block, cfg = families.build_block(name, dev)
        dims = families._dims(cfg)

        def floor_us(x, block=block, d=dims[1], f=dims[2], k=dims[3]):
            active = int(torch.unique(block.gate(x.view(-1, d))[2]).numel())
            return families.floor_ms(active, d, f, x.shape[1] * k, ceil) * 1e3

        yield name, find_patch(block).build(block, cfg, capacity="model", backend="triton"), dims[1], floor_us


with torch.no_grad():
    for name, layer, d, floor_us in blocks():
        for n in (1, 2):
            x = torch.randn(1, n, d, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "tokens": n, "floor_us": floor_us(x)}
            gemv.MAX_TOKENS = 0
            ref = layer(x).float()
            row["plan_us"] = median_ms(graphed(layer, x), dev, 50) * 1e3
            gemv.MAX_TOKENS = 64
            for bpp, tile, stages in VARIANTS:
                gemv._BYTES_PER_PROGRAM, gemv._TILE, gemv._LOOP_STAGES = bpp, tile, stages
                key = f"{bpp >> 10 if bpp < 1 << 30 else 'min'}k_{tile}_{stages}"
                try:
                    out = layer(x).float()
                    row[f"err_{key}"] = (out - ref).abs().max().item()
                    row[f"gemv_us_{key}"] = median_ms(graphed(layer, x), dev, 50) * 1e3
                except Exception as exc:
                    print(name, key, "failed:", type(exc).__name__, str(exc)[:200])
            best = min((v, kk) for kk, v in row.items() if kk.startswith("gemv_us"))
            print(
                f"{name:18s} n={n} floor {row['floor_us']:6.1f} us  plan {row['plan_us']:6.1f}  "
                f"gemv best {best[0]:6.1f} ({best[1][8:]})  "
                + " ".join(f"{kk[8:]}={v:.1f}" for kk, v in row.items() if kk.startswith("gemv_us"))
                + f"  maxerr {max(v for kk, v in row.items() if kk.startswith('err')):.3g}",
                flush=True,
            )
            res.append(row)
command = "python " + " ".join(sys.argv)
json.dump({"command": command, "env": environment(), "ceilings": ceil, "rows": res}, open(sys.argv[1], "w"), indent=1)
