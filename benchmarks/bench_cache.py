"""Expert buffering on one GPU: copy bandwidth, decode time vs fraction resident, policy hit rates.

    python benchmarks/bench_cache.py --out benchmarks/results/cache_h200.json

Measures, in one run:

* pinned and pageable host-to-device bandwidth (the ceiling the cache's copies are compared to);
* decode time per token (batch 1 and 8) of a small stack of MoE layers with the switch-base-128 and
  nllb-moe-54b layer shapes (bf16, random weights), fully resident and with 50% / 25% of each
  layer's experts resident (``optimize(expert_cache=fraction)``, LIFO), with the cache's hit rate,
  achieved copy bandwidth and the fraction of copy time hidden behind compute. Tokens follow a
  sticky, Zipf-skewed mixture of prototype hidden states, so routing has temporal locality;
* hit rates of every policy and Belady on synthetic skewed traces (``hf_moe_opt.cache``).

Writes JSON to ``--out`` and a PNG beside it. CUDA only; about 3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LAYER_SHAPES, environment  # noqa: E402

import hf_moe_opt  # noqa: E402
from hf_moe_opt.cache import POLICY_NAMES, hit_rate_curve, synthetic_trace  # noqa: E402

FRACTIONS = (1.0, 0.5, 0.25)


class MoEStack(nn.Module):
    """``num_layers`` HF sparse MoE blocks applied with residuals; enough for ``optimize`` to find them."""

    def __init__(self, family: str, num_layers: int):
        super().__init__()
        e, d, f, k = LAYER_SHAPES["switch-base-128" if family == "switch" else "nllb-moe-54b"]
        if family == "switch":
            from transformers import SwitchTransformersConfig
            from transformers.models.switch_transformers.modeling_switch_transformers import (
                SwitchTransformersSparseMLP,
            )

            self.config = SwitchTransformersConfig(d_model=d, d_ff=f, num_experts=e, expert_capacity=1 << 20)
            self.blocks = nn.ModuleList(SwitchTransformersSparseMLP(self.config) for _ in range(num_layers))
        else:
            from transformers import NllbMoeConfig
            from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

            self.config = NllbMoeConfig(d_model=d, encoder_ffn_dim=f, decoder_ffn_dim=f, num_experts=e)
            self.blocks = nn.ModuleList(NllbMoeSparseMLP(self.config, f) for _ in range(num_layers))
        self.d_model = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Host-to-device bytes/s from pinned and from pageable memory (median of 5)."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind, pin in (("pinned", True), ("pageable", False)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"{kind}_h2d_bytes_per_s"] = nbytes / times[len(times) // 2]
        del src
    return out


def token_stream(d: int, batch: int, steps: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Hidden states with temporal locality: each row sticks to its prototype with p=0.7, else redraws
    one from 64 Zipf-popular prototypes; small noise on top."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(64, d, generator=g)
    pop = 1.0 / torch.arange(1, 65, dtype=torch.float64)
    current = torch.multinomial(pop, batch, replacement=True, generator=g)
    out = []
    for _ in range(steps):
        redraw = torch.rand(batch, generator=g) > 0.7
        current = torch.where(redraw, torch.multinomial(pop, batch, replacement=True, generator=g), current)
        h = protos[current] + 0.1 * torch.randn(batch, d, generator=g)
        out.append(h.view(batch, 1, d).to(device, torch.bfloat16))
    return out


@torch.no_grad()
def decode_ms(model: nn.Module, stream: list[torch.Tensor], warmup: int) -> float:
    for x in stream[:warmup]:
        model(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in stream[warmup:]:
        model(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / (len(stream) - warmup)


def bench_family(family: str, num_layers: int, device: torch.device, steps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEStack(family, num_layers).to(torch.bfloat16).eval()
    rows = []
    for batch in (1, 8):
        stream = token_stream(model.d_model, batch, steps + warmup, device, seed=batch)
        for fraction in FRACTIONS:
            cached = fraction < 1.0
            torch.cuda.empty_cache()
            hf_moe_opt.optimize(model, capacity="none", expert_cache=fraction if cached else None)
            torch.cuda.reset_peak_memory_stats(device)
            if cached:
                decode_ms(model, stream[:warmup], 0)  # warm the cache, then count the measured steps only
                hf_moe_opt.reset_stats(model)
            ms = decode_ms(model, stream, warmup if not cached else 0)
            row = {
                "family": family,
                "layers": num_layers,
                "batch": batch,
                "fraction_resident": fraction,
                "ms_per_token": ms,
                "gpu_peak_bytes": torch.cuda.max_memory_allocated(device),
            }
            if cached:
                stats = hf_moe_opt.stats(model).values()
                hits = sum(s["hits"] for s in stats)
                misses = sum(s["misses"] for s in stats)
                copied = sum(s["bytes_copied"] for s in stats)
                copy_ms = sum(s["copy_time_ms"] for s in stats)
                stall_ms = sum(s["stall_time_ms"] for s in stats)
                row.update(
                    hit_rate=hits / max(hits + misses, 1),
                    bytes_copied=copied,
                    copy_bytes_per_s=copied / (copy_ms * 1e-3) if copy_ms else None,
                    copy_ms=copy_ms,
                    stall_ms=stall_ms,
                    hidden_copy_fraction=1.0 - stall_ms / copy_ms if copy_ms else None,
                    slot_bytes=sum(s["slot_bytes"] for s in stats),
                    host_pinned=all(s["host_pinned"] for s in stats),
                )
            hf_moe_opt.restore(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def policy_hit_rates() -> list[dict]:
    rows = []
    for name, (e, k, tokens) in {"switch-base-128 decode": (128, 1, 8), "nllb-moe-54b decode": (128, 2, 8)}.items():
        trace = synthetic_trace(e, k, tokens, 2000, zipf_s=1.0, stickiness=0.6, seed=0)
        slots = [8, 16, 32, 64]
        curve = hit_rate_curve(trace, POLICY_NAMES, slots)
        rows.append({"trace": name, "num_experts": e, "top_k": k, "tokens_per_step": tokens, "slots": slots, **curve})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for family in ("switch", "nllb"):
        for batch in (1, 8):
            rows = [r for r in result["decode"] if r["family"] == family and r["batch"] == batch]
            if rows:
                axes[0].plot(
                    [r["fraction_resident"] for r in rows],
                    [r["ms_per_token"] for r in rows],
                    marker="o",
                    label=f"{family} ({rows[0]['layers']} layers), batch {batch}",
                )
    axes[0].set(xlabel="fraction of experts resident", ylabel="ms per decode step", title="decode time")
    axes[0].invert_xaxis()
    axes[0].legend(fontsize=8)
    bw = result["bandwidth"]["pinned_h2d_bytes_per_s"] / 1e9
    copies = [r for r in result["decode"] if r.get("copy_bytes_per_s")]
    axes[1].bar(
        [f"{r['family']} b{r['batch']} {r['fraction_resident']}" for r in copies],
        [r["copy_bytes_per_s"] / 1e9 for r in copies],
    )
    axes[1].axhline(bw, color="k", linestyle="--", label=f"pinned H2D {bw:.1f} GB/s")
    axes[1].set(ylabel="GB/s", title="cache copy bandwidth")
    axes[1].tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[1].legend(fontsize=8)
    trace = result["hit_rates"][0]
    for name in [*POLICY_NAMES, "belady"]:
        axes[2].plot(trace["slots"], trace[name], marker="o", label=name)
    axes[2].set(xlabel="slots (of 128)", ylabel="hit rate", title=f"hit rate: {trace['trace']} (synthetic)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cache.json")
    p.add_argument("--switch-layers", type=int, default=4)
    p.add_argument("--nllb-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_cache.py needs a CUDA device (the expert cache copies host -> GPU); nothing to measure here")
        raise SystemExit(0)
    device = torch.device("cuda", torch.cuda.current_device())
    result = {"environment": environment(), "bandwidth": pinned_bandwidth(device)}
    print(json.dumps(result["bandwidth"]), flush=True)
    result["decode"] = bench_family("switch", args.switch_layers, device, args.steps, args.warmup)
    result["decode"] += bench_family("nllb", args.nllb_layers, device, args.steps, args.warmup)
    result["hit_rates"] = policy_hit_rates()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
