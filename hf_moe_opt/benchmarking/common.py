"""Shared pieces of the benchmarks: environment record, measured ceilings, the floor."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hf_moe_opt.timing import median_ms

# (num_experts, d_model, d_ff, top_k) of real models' MoE layers.
LAYER_SHAPES = {
    "switch-base-8": (8, 768, 3072, 1),
    "switch-base-128": (128, 768, 3072, 1),
    "switch-large-128": (128, 1024, 4096, 1),
    "nllb-moe-54b": (128, 2048, 8192, 2),
}


def environment() -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def measure_ceilings(device: torch.device, copy_numel: int = 1 << 28, matmul_size: int = 8192) -> dict:
    """Device copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured now.

    The defaults (512 MiB of bf16, 8192^3 matmul) saturate a data-centre GPU; CPU smoke runs pass less.
    """
    src = torch.empty(copy_numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    copy_bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    m = matmul_size
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms = median_ms(lambda: a @ b, device, repeats=10, warmup=3)
    return {"copy_bytes_per_s": copy_bw, "bf16_flops_per_s": 2 * m**3 / (ms * 1e-3)}


def floor_ms(active_experts: int, d: int, f: int, assignments: int, ceilings: dict, bias: bool = False) -> float:
    """max(bytes of the active experts' weights / copy bandwidth, FLOPs / matmul rate), in ms."""
    weight_bytes = active_experts * (2 * d * f + (d + f if bias else 0)) * 2
    flops = 2 * assignments * 2 * d * f
    return 1e3 * max(weight_bytes / ceilings["copy_bytes_per_s"], flops / ceilings["bf16_flops_per_s"])


def print_ceilings(ceilings: dict) -> None:
    tb, tf = ceilings["copy_bytes_per_s"] / 1e12, ceilings["bf16_flops_per_s"] / 1e12
    print(f"ceilings: copy {tb:.2f} TB/s, bf16 {tf:.0f} TFLOP/s", flush=True)


def save_result(result: dict, out: str | Path, plot: Callable[[dict, Path], None]) -> None:
    """Write ``result`` (with the command line that produced it) as JSON and its plot as a PNG beside it."""
    result = {"command": " ".join(sys.argv), **result}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
