"""Sweep of the plan-free decode kernels' block knobs against the plan path, graph-replayed, on one GPU
(python benchmarks/sweep_gemv.py OUT.json).
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
from hf_moe_opt.benchmarking.common import LAYER_SHAPES, floor_ms, measure_ceilings
from hf_moe_opt.benchmarking.layer import build_block, graphed
from hf_moe_opt.kernels import gemv
from hf_moe_opt.patches import NllbMoePatch, SwitchTransformersPatch, find_patch
from hf_moe_opt.timing import median_ms

dev = torch.device("cuda")
ceil = measure_ceilings(dev)
res = []
VARIANTS = list(itertools.product((16384, 65536, 1 << 40), (8192, 16384), (1, 3)))


def blocks():
    for name in ["switch-base-128", "switch-large-128", "nllb-moe-54b"]:
        e, d, f, k = LAYER_SHAPES[name]
        block, cfg = build_block(name, dev)
        patch = SwitchTransformersPatch() if k == 1 else NllbMoePatch()
        yield name, patch.build(block, cfg, capacity="model", backend="triton"), (e, d, f, k)
    for name in ["qwen3-30b-a3b", "mixtral-8x7b"]:
        block, cfg = families.build_block(name, dev)
        yield name, find_patch(block).build(block, cfg, capacity="model", backend="triton"), families._dims(cfg)


with torch.no_grad():
    for name, layer, (e, d, f, k) in blocks():
        for n in (1, 2):
            x = torch.randn(1, n, d, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "tokens": n, "floor_us": floor_ms(min(e, n * k), d, f, n * k, ceil) * 1e3}
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
json.dump({"rows": res, "ceilings": ceil, "torch": torch.__version__}, open(sys.argv[1], "w"), indent=1)
