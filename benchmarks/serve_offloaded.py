"""Serve a model whose experts live in host memory: real config, random bf16 weights, one GPU.

    python benchmarks/serve_offloaded.py --model nllb-moe-54b --fraction 0.25 \\
        [--modes copy read graphs] [--resident-baseline] --out benchmarks/results/offload_nllb54b_h200.json

The model is built in host memory, its dense modules moved to the GPU (``move_dense``), and
``optimize(model, expert_cache=fraction)`` keeps that fraction of every layer's experts in GPU slots
and the rest in pinned host memory. Reports GPU memory (allocated, peak), the bytes of the whole
model and of the resident experts, greedy ``generate`` time per new token (the median difference
between generating 1 and ``--new-tokens`` tokens, ``--runs`` runs each), the cache's hit rate and
its copy bandwidth beside the pinned host-to-device bandwidth measured in the same run, and the
host link's floor: the timed generations' copies and host reads at that rate, per decode step.
``--resident-baseline`` first times the same model fully resident on the GPU, with the same
``cuda_graphs`` setting, in the same process, and reports the cached time over it (``x_resident``).
The two models are timed one after the other, not interleaved (at nllb-moe-54b's size the resident
model takes most of the GPU, so both cannot be held at once): ``x_resident`` carries the run-to-run
drift of the host (seen: 0.83-1.12 at batch 1 where the cache hides all its work).
``--tiny`` runs a small config on whatever device exists (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_moe_opt  # noqa: E402
from hf_moe_opt.benchmarking.common import environment, json_out  # noqa: E402
from hf_moe_opt.benchmarking.model import random_model  # noqa: E402
from hf_moe_opt.cache.offload import move_dense  # noqa: E402


def tiny_model():
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    cfg = NllbMoeConfig(
        vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, num_experts=8, encoder_sparse_step=1,
        decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=2, pad_token_id=1, eos_token_id=2,
        bos_token_id=0, max_position_embeddings=128,
    )  # fmt: skip
    return NllbMoeForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def pinned_gbps(device: torch.device, nbytes: int = 1 << 28) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return 5 * nbytes / (start.elapsed_time(end) * 1e-3) / 1e9


def generate_ms(model, ids, new_tokens: int) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def decode_ms(model, ids, new_tokens: int, before_timing=None, runs: int = 3) -> tuple[float, float]:
    """(prefill + 1 token, per new token) in ms: medians of ``runs`` alternating 1 / ``new_tokens`` runs."""
    with torch.no_grad():
        generate_ms(model, ids, 2)  # warm-up: slots filled, kernels compiled, graphs captured
        if before_timing is not None:
            before_timing()
        times = [(generate_ms(model, ids, 1), generate_ms(model, ids, new_tokens)) for _ in range(runs)]
    short = statistics.median(r[0] for r in times)
    long = statistics.median(r[1] for r in times)
    # NaN where host jitter made the longer generation look no slower (tiny models on a busy CPU).
    return short, (long - short) / max(new_tokens - 1, 1) if long > short else float("nan")


def build(args) -> torch.nn.Module:
    with torch.no_grad():
        return tiny_model() if args.tiny else random_model(args.model, torch.device("cpu"))


GRAPH_MODES = {
    "copy": ("copy", {}),
    "read": ("read", {}),
    "graphs": ("read", {"cuda_graphs": "step"}),
    # "graphs" hands a replayed step's choices over with HF_MOE_OPT_STEP_HANDOVER=step; the others with
    # the hand-over in their names ("lag" is the default outside this script).
    "graphs_layer": ("read", {"cuda_graphs": "step"}),
    "graphs_layer_early": ("read", {"cuda_graphs": "step"}),
    "graphs_lag": ("read", {"cuda_graphs": "step"}),
}
HANDOVER = {"graphs_layer": "layer", "graphs_layer_early": "layer-early", "graphs_lag": "lag"}


def resident_ms(args, device: torch.device, graphs: dict) -> float:
    """Per-new-token time of the same model with every expert on the GPU (no cache)."""
    model = build(args).to(device)
    hf_moe_opt.optimize(model, **graphs)
    ids = prompt(model, args, device)
    per_token = decode_ms(model, ids, args.new_tokens, runs=args.runs)[1]
    del model
    release(device)
    return per_token


def prompt(model, args, device: torch.device) -> torch.Tensor:
    """The same random prompt for every run of the process, so that their times compare."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size - 1, (args.batch, args.prompt_len), generator=gen).to(device)


def release(device: torch.device) -> None:
    gc.collect()  # modules, hooks and graphs hold cycles: free the last run's GPU memory before the next
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # Freed pinned blocks stay in torch's host cache: hand them back before the next build.
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                break


def cached_run(args, device: torch.device, fraction: float, mode: str, policy: str) -> dict:
    """Build the model, keep ``fraction`` of each layer's experts in GPU slots, time greedy decoding."""
    cache_misses, graphs = GRAPH_MODES[mode]
    t0 = time.perf_counter()
    model = build(args)
    build_s = time.perf_counter() - t0
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    move_dense(model, device)
    os.environ["HF_MOE_OPT_STEP_HANDOVER"] = HANDOVER.get(mode, "step")
    t0 = time.perf_counter()
    hf_moe_opt.optimize(model, expert_cache=fraction, cache_policy=policy, cache_misses=cache_misses, **graphs)
    optimize_s = time.perf_counter() - t0
    stats = hf_moe_opt.stats(model)
    resident_bytes = sum(s["slot_bytes"] for s in stats.values())
    expert_bytes = sum(s["slot_bytes"] * s["num_experts"] / s["num_slots"] for s in stats.values())
    ids = prompt(model, args, device)
    reset = partial(hf_moe_opt.reset_stats, model)
    short, per_token = decode_ms(model, ids, args.new_tokens, before_timing=reset, runs=args.runs)
    stats = hf_moe_opt.stats(model)
    hits = sum(s["hits"] for s in stats.values())
    misses = sum(s["misses"] for s in stats.values())
    copied = sum(s["bytes_copied"] for s in stats.values())
    copy_ms = sum(s["copy_time_ms"] for s in stats.values())
    run = {
        "fraction_resident": fraction,
        "mode": mode,
        "policy": policy,
        "cache_misses": cache_misses,
        "step_graphs": bool(graphs),
        "handover": HANDOVER.get(mode, "step") if graphs else None,
        "host_reads": sum(s["host_reads"] for s in stats.values()),
        "build_s": build_s,
        "optimize_s": optimize_s,
        "model_gib": model_bytes / 2**30,
        "expert_gib": expert_bytes / 2**30,
        "resident_expert_gib": resident_bytes / 2**30,
        "gpu_allocated_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "prefill_plus_1_token_ms": short,
        "ms_per_new_token": per_token,
        "hit_rate": hits / max(hits + misses, 1),
        "bytes_copied": copied,
        # Over the host link in the timed generations (prefill included): copies and reads of host memory.
        "link_bytes": copied + sum(s["host_read_bytes"] for s in stats.values()),
        "timed_steps": args.runs * (1 + args.new_tokens),
        "copy_gbps": copied / (copy_ms * 1e-3) / 1e9 if copy_ms > 0 else None,
        "cache_host_ms_per_new_token": cache_host_ms(model, ids, args.new_tokens),
        "host_pinned_layers": sum(bool(s["host_pinned"]) for s in stats.values()),
        "cached_layers": len(stats),
    }
    del model, reset  # the partial holds the model too: the next run must not build beside it
    release(device)
    return run


def cache_host_ms(model, ids, new_tokens: int) -> float:
    """The caches' own host time per new token (``host_time_ms``: policies, loads issued, table pushes;
    for eager calls the kernels' launches too), as the times are taken: N tokens minus 1, over N - 1."""
    spent = []
    for n in (1, new_tokens):
        hf_moe_opt.reset_stats(model)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        spent.append(sum(s["host_time_ms"] for s in hf_moe_opt.stats(model).values()))
    return (spent[1] - spent[0]) / max(new_tokens - 1, 1)


def _label(run: dict, with_policy: bool) -> str:
    return f"cached, {run['mode']}, {run['policy']}" if with_policy else f"cached, {run['mode']}"


def plot(result: dict, path: Path) -> None:
    """Time per new token by resident fraction: each mode's bar beside the resident model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_moe_opt.benchmarking.common import grouped_bars

    fractions = sorted({r["fraction_resident"] for r in result["runs"]}, reverse=True)
    several = len({r.get("policy") for r in result["runs"]}) > 1
    modes = list(dict.fromkeys(r["mode"] for r in result["runs"]))
    # Eager bars first, then graphed ones: each cached mode beside the resident run it compares with.
    order = ["resident, eager", "cached, copy", "cached, read", "resident, graphs", "cached, graphs"]
    order += ["cached, graphs_layer", "cached, graphs_layer_early", "cached, graphs_lag"]
    rows = []
    for fraction in fractions:
        row = {f"resident, {k}": v for k, v in result["resident_ms_per_new_token"].items()}
        for run in result["runs"]:
            if run["fraction_resident"] == fraction:
                row[_label(run, several)] = run["ms_per_new_token"]
        rows.append(row)
    names = [n for n in order if any(n in row for row in rows)]
    names += [n for n in dict.fromkeys(k for row in rows for k in row) if n not in names]
    rows = [{n: row.get(n, float("nan")) for n in names} for row in rows]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 + 0.8 * len(fractions) * (len(modes) + 1)), 3.6))
    grouped_bars(ax, rows, [f"{f:.0%} of experts resident" for f in fractions])
    ax.set_ylabel("ms per new token (greedy, median)")
    env = result["environment"]
    ax.set_title(
        f"{result['model']}, batch {result['batch']}, {result['policy']} policy\n"
        f"{env.get('device')}, torch {env.get('torch')}, transformers {env.get('transformers')}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nllb-moe-54b", choices=["nllb-moe-54b", "switch-base-128"])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.25], help="experts resident per layer")
    p.add_argument(
        "--policy", nargs="+", default=["lfu"], help="eviction policies, each run in turn at every fraction and mode"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=sorted(GRAPH_MODES),
        default=["copy"],
        help='cache_misses="copy", "read", or "read" with cuda_graphs="step" (batches up to 8), the choices of a '
        "replayed step handed over with HF_MOE_OPT_STEP_HANDOVER=step (graphs), layer, layer-early or lag (graphs_lag, "
        "the default outside this script); see hf_moe_opt.cache.host_reads",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3, help="timed 1- and N-token generations per setting (medians)")
    p.add_argument(
        "--resident-baseline", action="store_true", help="also time the model fully resident (same graph settings)"
    )
    p.add_argument("--tiny", action="store_true", help="a small config (smoke test, any device)")
    p.add_argument("--out", type=json_out, default="benchmarks/results/offload.json")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of a result file")
    args = p.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("error: serving the real config needs a CUDA device (use --tiny for a smoke test)", file=sys.stderr)
        return 2
    graph_settings = {"graphs" if GRAPH_MODES[m][1] else "eager" for m in args.modes}
    baselines = {}
    if args.resident_baseline:
        for setting in sorted(graph_settings):
            baselines[setting] = resident_ms(args, device, {"cuda_graphs": "step"} if setting == "graphs" else {})
            print(f"resident ({setting}): {baselines[setting]:.3f} ms per new token", flush=True)
    runs = []
    for fraction in args.fraction:
        for mode in args.modes:
            for policy in args.policy:
                run = cached_run(args, device, fraction, mode, policy)
                base = baselines.get("graphs" if run["step_graphs"] else "eager")
                run["x_resident"] = run["ms_per_new_token"] / base if base else None
                runs.append(run)
                print(f"--- fraction {fraction}, {mode}, {policy}")
                for key, value in run.items():
                    text = f"{value:.3f}" if isinstance(value, float) else value
                    print(f"{key:>24}: {text}", flush=True)
    pinned = pinned_gbps(device)
    for run in runs:  # the link's floor beside the time: its bytes per decode step at the pinned rate
        run["link_floor_ms_per_step"] = run["link_bytes"] / run["timed_steps"] / (pinned * 1e6) if pinned else None
        print(
            f"fraction {run['fraction_resident']}, {run['mode']}, {run['policy']}: {run['ms_per_new_token']:.3f} ms "
            "per new token, "
            f"host-link floor {run['link_floor_ms_per_step'] or float('nan'):.3f} ms per step"
        )
    result = {
        "command": " ".join(sys.argv),
        "environment": environment(),
        "model": "tiny" if args.tiny else args.model,
        "policy": ", ".join(args.policy),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "timed_runs": args.runs,
        "pinned_h2d_gbps": pinned,
        "resident_ms_per_new_token": baselines,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"pinned host-to-device: {result['pinned_h2d_gbps']} GB/s\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
