"""Load-balanced expert placement on two GPUs: one process over 2 GPUs, and 2-rank expert parallelism.

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_placement.py --out benchmarks/results/placement_h200x2.json

For the switch-base-128 and nllb-moe-54b layer shapes (bf16) with the router biased so expert
popularity follows a Zipf law (``--alpha``), it

1. profiles the routing of a few batches and plans ``round_robin``, ``greedy`` and ``replicate``
   (1 spare slot per GPU) placements over 2 GPUs, reporting each plan's max/mean device load on
   held-out batches;
2. single process: times the layer with all experts on one GPU and with each plan over 2 GPUs
   (``PlacedExpertStore``), checking the 2-GPU output against 1 GPU on a subset of tokens;
3. expert parallelism: relaunches itself under ``torchrun --nproc_per_node 2`` (NCCL) and times
   the ``ExpertParallelStore`` with each plan, every rank feeding its own tokens and checking them
   against the 1-GPU layer.

Beside every time it prints a modelled one from the routing of the timed batch and the ceilings
measured in the same run: an expert's slot on a device costs
``max(its rows' FLOPs / matmul rate, its weight bytes / copy bandwidth)`` (nothing if it gets no
rows), a device the sum over its slots, a plan its slowest device. The model says where placement
can pay: with few rows per expert every slot costs one weight read whatever the plan, and only
with many rows per expert does the busiest device's token share set the time.

Writes JSON and a PNG beside it. Needs 2 CUDA GPUs (exits with a message otherwise);
``--smoke`` runs tiny shapes on CPU (gloo) to check the script itself. NVLink multicast stays off:
the script sets ``NCCL_NVLS_ENABLE=0`` unless already set, and refuses any other value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # uninstalled: torchrun's workers too
from hf_moe_opt.benchmarking.common import (
    LAYER_SHAPES,
    environment,
    json_out,  # noqa: E402
    measure_ceilings,
    memory_bandwidth,
    print_ceilings,
    pyplot_or_none,
)
from hf_moe_opt.placement import RoutingTrace, plan_placement  # noqa: E402
from hf_moe_opt.placement.store import PlacedExpertStore, ReplicaTable  # noqa: E402

SHAPES = ("switch-base-128", "nllb-moe-54b")
SMOKE_SHAPES = {"switch-tiny": (16, 32, 64, 1), "nllb-tiny": (16, 32, 64, 2)}
STRATEGIES = ("round_robin", "greedy", "replicate")
LAYER = "layer"


def shape_of(name: str) -> tuple[int, int, int, int]:
    return SMOKE_SHAPES[name] if name in SMOKE_SHAPES else LAYER_SHAPES[name]


def build_layer(name: str, device: torch.device, alpha: float, seed: int = 0, backend: str = "torch"):
    """An optimized layer at ``name``'s shape whose router favours experts by a Zipf law.

    Hidden states carry a constant feature (column 0, value 1); the router's weight on it is
    ``log p_e`` with ``p_e`` Zipf over a random expert order, and its other weights give logit noise
    of about a Gumbel's spread, so the argmax roughly follows the Zipf law.
    """
    from transformers import NllbMoeConfig, SwitchTransformersConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from hf_moe_opt.patches import NllbMoePatch, SwitchTransformersPatch

    e, d, f, k = shape_of(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        if k == 1:
            cfg = SwitchTransformersConfig(d_model=d, d_ff=f, num_experts=e, expert_capacity=1 << 30)
            block = SwitchTransformersSparseMLP(cfg).to(dtype).eval()
            layer = SwitchTransformersPatch().build(block, cfg, capacity="none", backend=backend)
        else:
            cfg = NllbMoeConfig(d_model=d, num_experts=e, moe_token_dropout=0.0, expert_capacity=1 << 30)
            block = NllbMoeSparseMLP(cfg, ffn_dim=f).to(dtype).eval()
            layer = NllbMoePatch().build(block, cfg, capacity="none", backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    rank = torch.randperm(e, generator=g) + 1
    with torch.no_grad():
        w = layer.router.classifier.weight
        # Logit noise of std ~1.3 (about a Gumbel's) plus log-popularity: argmax ~ Zipf(alpha).
        w.normal_(0.0, 1.28 / d**0.5)
        w[:, 0] = (-alpha * torch.log(rank.to(torch.float32))).to(w.dtype).to(w.device)
    return layer, d


def hidden_batch(tokens: int, d: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, tokens, d, generator=g)
    x[..., 0] = 1.0
    return x.to(device=device, dtype=dtype)


def trace_of(layer, d: int, device, dtype, batches: int, tokens: int, seed: int) -> RoutingTrace:
    trace = RoutingTrace(model_name="bench", num_experts=layer.num_experts)
    with torch.no_grad():
        for b in range(batches):
            routing = layer.route(layer.router, hidden_batch(tokens, d, device, dtype, seed + b), None)
            trace.add_routing(LAYER, routing.expert_index, routing.keep)
    return trace


def modelled_ms(layer, plan, xs: list[torch.Tensor], ceilings: dict | None) -> dict | None:
    """Per-device roofline time of ``plan`` for the rows of the batches ``xs`` (see the docstring)."""
    from hf_moe_opt.dispatch import make_plan

    if not ceilings:
        return None
    e = layer.num_experts
    f, d = layer.weights.w1.tensor.shape[1:]  # [E, F, D]
    table = ReplicaTable(plan, LAYER, e)
    rows = torch.zeros(table.num_devices + 1, e, dtype=torch.int64)
    with torch.no_grad():
        for x in xs:
            routing = layer.route(layer.router, x, None)
            dp = make_plan(routing.expert_index, routing.gates, routing.keep, e)
            target = table.targets(dp).cpu()
            rows.index_put_((target, dp.expert.clamp(max=e - 1).cpu()), torch.ones_like(target), accumulate=True)
    rows = rows[: table.num_devices].double()
    flops_per_row = 2 * 2 * d * f
    weight_bytes = 2 * d * f * layer.weights.w1.tensor.element_size()
    slot_ms = (
        torch.maximum(
            rows * flops_per_row / ceilings["bf16_flops_per_s"],
            torch.full_like(rows, weight_bytes / memory_bandwidth(ceilings)),
        )
        * 1e3
    )
    per_device = torch.where(rows > 0, slot_ms, 0.0).sum(1)
    return {
        "ms": per_device.max().item(),
        "per_device_ms": per_device.tolist(),
        "rows_per_device": rows.sum(1).tolist(),
        "slots_used_per_device": (rows > 0).sum(1).tolist(),
    }


def sync_all(devices) -> None:
    for dev in {torch.device(x) for x in devices}:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


def time_ms(fn, devices, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync_all(devices)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync_all(devices)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return times[len(times) // 2]


def _row_text(tokens: int, row: dict) -> str:
    model = row.get("model")
    return f"{tokens}: {row['ms']:.2f} ms" + (f" (model {model['ms']:.2f})" if model else "")


def add_ratios(row: dict, model_of) -> None:
    """Measured (and modelled) throughput of the balanced plans over round-robin, in ``row``."""
    for s, key in (("greedy", "balanced_over_round_robin"), ("replicate", "replicate_over_round_robin")):
        row[key] = row[s]["tokens_per_s"] / row["round_robin"]["tokens_per_s"]
        model, base = model_of(s), model_of("round_robin")
        if model and base:
            row[key + "_model"] = base["ms"] / model["ms"]


def profile_table(fn, devices, path: Path, label: str) -> None:
    """One call of ``fn`` under ``torch.profiler`` (after a warm call): the top ops by device and host time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync_all(devices)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        sync_all(devices)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    with path.open("a") as f:
        f.write(f"==== {label}\n{table}\n")


def plans_for(trace: RoutingTrace, world: int) -> dict:
    fit, held = trace.split(0.5)
    out = {}
    for s in STRATEGIES:
        plan = plan_placement(fit, world, s, 1 if s == "replicate" else 0)
        out[s] = (plan, plan.evaluate(held)["overall"])
    return out


# ------------------------------------------------------------------------------ single process


def single_process(args, devices: list[torch.device]) -> dict:
    results = {}
    for name in args.shapes:
        layer, d = build_layer(name, devices[0], args.alpha, backend=args.backend)
        dtype = layer.weights.w1.tensor.dtype
        trace = trace_of(layer, d, devices[0], dtype, args.profile_batches, args.tokens[-1], seed=100)
        plans = plans_for(trace, len(devices))
        check_x = hidden_batch(args.check_tokens, d, devices[0], dtype, seed=7)
        with torch.no_grad():
            want = layer(check_x)
        entry: dict = {"shape": list(shape_of(name)), "tokens": {}, "plans": {}}
        xs = {t: hidden_batch(t, d, devices[0], dtype, seed=999) for t in args.tokens}
        # The batches every rank feeds in the expert-parallel part (seeds 999 + rank), for its model.
        ep_xs = {
            t: [hidden_batch(t, d, devices[0], dtype, seed=999 + r) for r in range(len(devices))] for t in args.tokens
        }
        with torch.no_grad():
            for t in args.tokens:
                ms = time_ms(lambda t=t, layer=layer, xs=xs: layer(xs[t]), devices[:1], args.repeats)
                entry["tokens"].setdefault(str(t), {})["one_gpu"] = {"ms": ms, "tokens_per_s": t / ms * 1e3}
            for s, (plan, quality) in plans.items():
                layer.store = PlacedExpertStore(layer.weights, ReplicaTable(plan, LAYER, layer.num_experts), devices)
                layer._resolved.clear()
                got = layer(check_x)
                err = (got.float() - want.float()).abs().max().item()
                entry["plans"][s] = {"held_out": quality, "max_abs_err_vs_one_gpu": err, "equal": bool(err == 0.0)}
                for t in args.tokens:
                    ms = time_ms(lambda t=t, layer=layer, xs=xs: layer(xs[t]), devices, args.repeats)
                    if args.profile and t == args.tokens[-1]:
                        label = f"single process, {name}, {s}, {t} tokens"
                        profile_table(lambda t=t, layer=layer, xs=xs: layer(xs[t]), devices, args.profile, label)
                    model = modelled_ms(layer, plan, [xs[t]], args.ceilings)
                    ep_model = modelled_ms(layer, plan, ep_xs[t], args.ceilings)
                    entry["tokens"][str(t)][s] = {"ms": ms, "tokens_per_s": t / ms * 1e3, "model": model}
                    entry.setdefault("ep_model", {}).setdefault(str(t), {})[s] = ep_model
                print(
                    f"[single] {name} {s}: held-out max/mean {quality['avg_max_over_mean']:.3f}, err {err:.2e}, "
                    + ", ".join(_row_text(t, entry["tokens"][str(t)][s]) for t in args.tokens),
                    flush=True,
                )
        for t in args.tokens:
            row = entry["tokens"][str(t)]
            add_ratios(row, lambda s, row=row: row[s]["model"])
            ep_row = entry.get("ep_model", {}).get(str(t), {})
            if ep_row:
                ep_model = {s: ep_row[s] for s in STRATEGIES}
                for s in ("greedy", "replicate"):
                    if ep_model[s] and ep_model["round_robin"]:
                        ep_row[f"{s}_over_round_robin"] = ep_model["round_robin"]["ms"] / ep_model[s]["ms"]
        results[name] = entry
        del layer
        if devices[0].type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------ expert parallel


def ep_worker(args) -> None:
    import datetime

    import torch.distributed as dist

    from hf_moe_opt.placement.expert_parallel import ExpertParallelStore

    smoke = args.smoke
    local = int(os.environ.get("LOCAL_RANK", 0))
    if smoke:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in args.shapes:
        entry: dict = {"shape": list(shape_of(name)), "tokens_per_rank": {}, "plans": {}}
        for s in STRATEGIES:
            layer, d = build_layer(name, device, args.alpha, backend=args.backend)  # same seed on every rank
            dtype = layer.weights.w1.tensor.dtype
            trace = trace_of(layer, d, device, dtype, args.profile_batches, args.tokens[-1], seed=100)
            plan, quality = plans_for(trace, world)[s]
            check_x = hidden_batch(args.check_tokens, d, device, dtype, seed=7 + rank)
            xs = {t: hidden_batch(t, d, device, dtype, seed=999 + rank) for t in args.tokens}
            with torch.no_grad():
                want = layer(check_x)
                layer.store = ExpertParallelStore(
                    layer.weights, ReplicaTable(plan, LAYER, layer.num_experts), None, LAYER
                )
                layer._resolved.clear()
                got = layer(check_x)
                err = torch.tensor([(got.float() - want.float()).abs().max().item()], device=device)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                entry["plans"][s] = {"held_out": quality, "max_abs_err_vs_one_gpu": err.item()}
                for t in args.tokens:

                    def step(t=t, layer=layer, xs=xs):
                        layer(xs[t])

                    ms = time_ms(step, [device], args.repeats)
                    if args.profile and rank == 0 and t == args.tokens[-1]:
                        label = f"expert parallel rank 0, {name}, {s}, {t} tokens per rank"
                        profile_table(step, [device], args.profile, label)
                    elif args.profile and t == args.tokens[-1]:
                        step()  # the profiled call's collectives need every rank
                        step()
                        sync_all([device])
                    worst = torch.tensor([ms], device=device)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    entry["tokens_per_rank"].setdefault(str(t), {})[s] = {
                        "ms": worst.item(),
                        "tokens_per_s": world * t / worst.item() * 1e3,
                    }
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if rank == 0:
                print(
                    f"[ep] {name} {s}: err {entry['plans'][s]['max_abs_err_vs_one_gpu']:.2e}, "
                    + ", ".join(f"{t}/rank: {entry['tokens_per_rank'][str(t)][s]['ms']:.2f} ms" for t in args.tokens),
                    flush=True,
                )
        for t in args.tokens:
            add_ratios(entry["tokens_per_rank"][str(t)], lambda s: None)
        results[name] = entry
    if rank == 0:
        Path(args.ep_out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def launch_ep(args, out: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--ep-worker",
        "--ep-out",
        str(out),
        "--alpha",
        str(args.alpha),
        "--backend",
        args.backend,
        "--repeats",
        str(args.repeats),
        "--profile-batches",
        str(args.profile_batches),
        "--check-tokens",
        str(args.check_tokens),
        "--tokens",
        *map(str, args.tokens),
        "--shapes",
        *args.shapes,
    ]
    if args.smoke:
        cmd.append("--smoke")
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    subprocess.run(cmd, check=True, env=env, timeout=args.ep_timeout)
    return json.loads(out.read_text())


def plot(result: dict, path: Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    shapes = list(result["single_process"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, name in zip(axes[0], shapes, strict=True):
        t = str(max(int(x) for x in result["single_process"][name]["tokens"]))
        sp = result["single_process"][name]["tokens"][t]
        labels = ["1 GPU"] + [f"2 GPU {s}" for s in STRATEGIES]
        values = [sp["one_gpu"]["tokens_per_s"]] + [sp[s]["tokens_per_s"] for s in STRATEGIES]
        if "expert_parallel" in result and name in result["expert_parallel"]:
            ep = result["expert_parallel"][name]["tokens_per_rank"][t]
            labels += [f"EP {s}" for s in STRATEGIES]
            values += [ep[s]["tokens_per_s"] for s in STRATEGIES]
        ax.bar(range(len(values)), [v / 1e3 for v in values])
        ax.set_xticks(range(len(values)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("k tokens / s")
        ax.set_title(f"{name}, {t} tokens (per rank for EP), Zipf alpha={result['alpha']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=json_out, default=Path("benchmarks/results/placement_h200x2.json"))
    parser.add_argument("--shapes", nargs="+", default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-batches", type=int, default=8)
    parser.add_argument("--check-tokens", type=int, default=2048)
    parser.add_argument("--no-ep", action="store_true", help="skip the expert-parallel part")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo): checks the script only")
    parser.add_argument(
        "--profile", type=Path, default=None, help="append torch.profiler tables of one call per plan to this file"
    )
    parser.add_argument("--ep-timeout", type=int, default=300)
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["auto", "torch", "triton"],
        help="the expert compute of every plan (torch: a device's share of experts is a shape the Triton "
        "config tables were not tuned for)",
    )
    parser.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ep-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
        print("refusing to run with NCCL_NVLS_ENABLE != 0 (NVLink multicast must stay off)")
        return 2
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if args.shapes is None:
        args.shapes = list(SMOKE_SHAPES) if args.smoke else list(SHAPES)
    if args.smoke:
        args.tokens = [t for t in args.tokens if t <= 512] or [256]
        args.check_tokens = min(args.check_tokens, 128)
    if args.ep_worker:
        ep_worker(args)
        return 0
    if args.smoke:
        devices = [torch.device("cpu"), torch.device("cpu")]
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            print(
                "bench_placement needs 2 CUDA GPUs (found "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}); use --smoke for a CPU check"
            )
            return 0
        devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small = {"copy_numel": 1 << 16, "matmul_size": 128} if args.smoke else {}
    args.ceilings = measure_ceilings(devices[0], **small)
    print_ceilings(args.ceilings)
    result = {
        "command": " ".join(sys.argv),
        "environment": environment(),
        "ceilings": args.ceilings,
        "backend": args.backend,
        "alpha": args.alpha,
        "devices": [str(d) for d in devices],
        "single_process": single_process(args, devices),
    }
    if not args.no_ep:
        result["expert_parallel"] = launch_ep(args, args.out.with_suffix(".ep.json"))
        args.out.with_suffix(".ep.json").unlink(missing_ok=True)
    result["wall_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
