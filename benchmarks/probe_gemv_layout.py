"""One-token decode through the plan-free GEMV kernels on experts stored ``[E, in, out]`` (Llama 4,
GPT-OSS), by column block of the contiguous-columns rule (0: the rule off, blocks sized as for
``[E, out, in]`` storage), beside the torch backend; CUDA-graph replayed, one GPU.

    python benchmarks/probe_gemv_layout.py OUT.json [--tiles]

``--tiles``: column blocks 8-32 by elements per tile 4096-16384 instead.

The floor: the chosen experts' bytes (and Llama 4's shared MLP, which every token runs) over the
read bandwidth measured in the same run.
"""

# The timed closures run inside the loop iteration that defines them.
# ruff: noqa: B023
import json
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("probe_gemv_layout.py needs a CUDA GPU")

sys.path.insert(0, ".")
import transformers  # noqa: E402

from hf_moe_opt.benchmarking import families  # noqa: E402
from hf_moe_opt.benchmarking.common import environment, measure_ceilings, memory_bandwidth, print_ceilings  # noqa: E402
from hf_moe_opt.benchmarking.layer import graphed  # noqa: E402
from hf_moe_opt.kernels import gemv  # noqa: E402
from hf_moe_opt.patches import find_patch  # noqa: E402
from hf_moe_opt.timing import median_ms  # noqa: E402

dev = torch.device("cuda")
ceil = measure_ceilings(dev)
print_ceilings(ceil, dev)
BLOCKS = (0, 16, 32, 64, 128, 256) if "--tiles" not in sys.argv else (8, 16, 32)
TILES = (8192,) if "--tiles" not in sys.argv else (4096, 8192, 16384)


def gpt_oss_block():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = transformers.GptOssConfig(
        hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4, num_hidden_layers=1
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            block = GptOssMLP(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.eval(), config


rows = []
with torch.no_grad():
    for name in ("llama4-scout", "llama4-maverick", "gpt-oss-120b"):
        if name == "gpt-oss-120b":
            block, config = gpt_oss_block()
            d, f, k, shared = 2880, 2880, 4, 0
            bytes_per_expert = 2 * (3 * d * f + 2 * f + d)
        else:
            block, config = families.build_block(name, dev)
            _, d, f, k = families._dims(config)
            shared, bytes_per_expert = 1, 2 * 3 * d * f
        layer = find_patch(block).build(block, config, capacity="model", backend="torch")
        x = torch.randn(1, 1, d, device=dev, dtype=torch.bfloat16)
        row = {"shape": name, "tokens": 1, "floor_us": 1e6 * (k + shared) * bytes_per_expert / memory_bandwidth(ceil)}
        ref = families._hidden(layer(x)).float()
        row["torch_graph_us"] = 1e3 * median_ms(graphed(layer, x), dev, 50)
        layer.backend = "triton"
        layer._resolved.clear()
        variants = [(bn, tile) for bn in BLOCKS for tile in TILES]
        for bn, tile in variants:
            gemv._CONTIGUOUS_BLOCK_N, gemv._CONTIGUOUS_TILE = bn, tile
            key = f"{bn}" if len(TILES) == 1 else f"{bn}_{tile}"
            out = families._hidden(layer(x)).float()
            row[f"err_{key}"] = (out - ref).abs().max().item()
            row[f"triton_graph_us_{key}"] = 1e3 * median_ms(graphed(layer, x), dev, 50)
        print(
            f"{name:16s} floor {row['floor_us']:7.1f} us  torch {row['torch_graph_us']:7.1f}  "
            + " ".join(f"{k[16:]}={v:.1f}" for k, v in row.items() if k.startswith("triton_graph_us_"))
            + f"  maxerr {max(v for k, v in row.items() if k.startswith('err_')):.3g}",
            flush=True,
        )
        rows.append(row)
        del block, layer
        torch.cuda.empty_cache()
command = "python " + " ".join(sys.argv)
json.dump({"command": command, "env": environment(), "ceilings": ceil, "rows": rows}, open(sys.argv[1], "w"), indent=1)
