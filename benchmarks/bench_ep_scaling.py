"""Expert parallelism at model level: the nllb-moe-54b encoder over N ranks, balanced vs round-robin.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 8 benchmarks/bench_ep_scaling.py \\
        --out benchmarks/results/ep_scaling_h200x8.json
    python benchmarks/bench_ep_scaling.py --smoke --ranks 4 --out /tmp/ep.json   # CPU, gloo, tiny model

Every rank builds the same model (the real nllb-moe-54b dimensions and 128 experts, ``--layers``
encoder layers of which every ``--sparse-step``-th is sparse as in the real config, one decoder
layer that is not used, random bf16 weights from the same seed), so every rank holds identical
weights before sharding. Then, on every rank at once:

1. **one GPU**: the encoder optimized with resident experts (``optimize``), timed at ``--batches``
   x ``--seq`` random tokens; its outputs on a small check batch (each rank its own) are the
   reference;
2. the routing of ``--profile-batches`` batches (the same on every rank) is profiled once and a
   placement is planned per strategy (``round_robin``, ``greedy``; ``--strategies``), with its
   load balance on the profiled batches;
3. per strategy, a fresh copy of the model is sharded with
   ``optimize(encoder, expert_parallel=True, placement=plan)``: the check batch is compared with
   the reference (max abs error), then every rank feeds its own ``batch x seq`` tokens and the
   encoder is timed (CUDA events, median of ``--repeats`` after a warm-up). Tokens/s count all
   ranks' tokens over the slowest rank's time. The all-to-alls are timed per MoE layer call on the
   compute stream (the time it waits for each collective).

Floors, from the copy bandwidth and bf16 matmul rate measured in the same run
(:mod:`hf_moe_opt.benchmarking.floors`, counted on rank 0's batch): one GPU, the bytes its encoder
reads and its FLOPs; N ranks, a lower bound for the busiest rank: the same FLOPs (every rank runs
as many tokens), the dense weights, and at least an N-th of the experts rank 0's batch touches.

Rank 0 writes JSON (command, versions, world size) and a PNG beside it. Memory per GPU at the
defaults (4 encoder layers, 2 sparse): about 21 GB of bf16 weights before sharding, twice that
while the one-GPU reference and a sharded copy coexist. ``--smoke`` relaunches itself under
``torchrun`` with ``--ranks`` CPU processes (gloo) on a tiny NLLB-MoE config: it checks the script,
its times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_moe_opt  # noqa: E402
from hf_moe_opt.benchmarking.common import (
    environment,
    json_out,  # noqa: E402
    measure_ceilings,
    memory_bandwidth,
    print_ceilings,
    pyplot_or_none,
    save_result,
)
from hf_moe_opt.benchmarking.floors import encoder_floor  # noqa: E402
from hf_moe_opt.benchmarking.model import random_model, real_config, tiny_config  # noqa: E402

MODEL = "nllb-moe-54b"


def model_config(args):
    cfg = tiny_config(MODEL) if args.smoke else real_config(MODEL)
    cfg.encoder_layers = args.layers
    cfg.encoder_sparse_step = args.sparse_step
    cfg.decoder_layers = 1
    cfg.decoder_sparse_step = 2  # the one decoder layer stays dense
    return cfg


def build(args, device: torch.device):
    """The whole model (kept so that shared embeddings stay alive) and its encoder; same seed everywhere."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed(0)
    model = random_model(MODEL, device, model_config(args))
    return model, model.get_encoder()


def ids_for(seed: int, batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 1000), (batch, seq), generator=g).to(device)


class _Clock:
    """Intervals timed by CUDA events on the current stream (resolved later), or by the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> torch.cuda.Event | float:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, begin) -> tuple[torch.cuda.Event, torch.cuda.Event] | float:
        """A token for :meth:`ms`: the event pair on CUDA (no sync here), elapsed ms on the CPU."""
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return begin, ev
        return (time.perf_counter() - begin) * 1e3

    @staticmethod
    def ms(token) -> float:
        if isinstance(token, tuple):
            begin, end = token
            end.synchronize()
            return begin.elapsed_time(end)
        return token


def time_encoder(encoder, ids: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median ms of one encoder forward after two warm-up calls; ranks start each call together."""
    clock = _Clock(device)
    with torch.no_grad():
        for _ in range(2):
            encoder(input_ids=ids)
        times = []
        for _ in range(repeats):
            dist.barrier()
            begin = clock.start()
            encoder(input_ids=ids)
            times.append(clock.ms(clock.stop(begin)))
    return statistics.median(times)


def watch_all_to_alls(encoder, device: torch.device) -> list:
    """Wrap every expert-parallel store's all-to-all with a timer; returns the list it appends to."""
    clock, records = _Clock(device), []
    for _, layer in hf_moe_opt.optimized_layers(encoder):
        store = layer.store
        inner = store._all_to_all

        def timed(*a, _inner=inner, **kw):
            begin = clock.start()
            _inner(*a, **kw)
            records.append(clock.stop(begin))

        store._all_to_all = timed
    return records


def worker(args) -> dict | None:
    """One rank's part; rank 0 returns the summary of all ranks."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.smoke:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    ceilings = measure_ceilings(device, **({"copy_numel": 1 << 20, "matmul_size": 128} if args.smoke else {}))
    if rank == 0:
        print_ceilings(ceilings)

    model, encoder = build(args, device)
    vocab = model.config.vocab_size
    hf_moe_opt.optimize(encoder, backend=args.backend)
    check = ids_for(1000 + rank, args.check_batch, args.seq, vocab, device)
    with torch.no_grad():
        reference = encoder(input_ids=check).last_hidden_state.float()
    one_gpu, floors = {}, {}
    for batch in args.batches:
        ids = ids_for(2000 + rank, batch, args.seq, vocab, device)
        one_gpu[batch] = time_encoder(encoder, ids, device, args.repeats)
        floors[batch] = encoder_floor(model, ids, ceilings)
    # The same batches on every rank: the same trace and the same plans everywhere.
    profile_batches = [{"input_ids": ids_for(i, 8, args.seq, vocab, device)} for i in range(args.profile_batches)]
    trace = hf_moe_opt.profile(encoder, profile_batches, progress=rank == 0)
    hf_moe_opt.restore(encoder)
    del model, encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = {}
    for strategy in args.strategies:
        plan = hf_moe_opt.plan_placement(trace, world, strategy)
        model, encoder = build(args, device)
        hf_moe_opt.optimize(encoder, expert_parallel=True, placement=plan, backend=args.backend)
        with torch.no_grad():
            got = encoder(input_ids=check).last_hidden_state.float()
        diff = (got - reference).abs()
        error = diff.max().item()
        # Tokens whose output moved by more than 1% of the reference's largest value: rounding shifts
        # every token a little, a flipped routing decision moves a few tokens a lot.
        moved = (diff.amax(-1) > 0.01 * reference.abs().amax()).float().mean().item()
        records = watch_all_to_alls(encoder, device)
        per_batch = {}
        for batch in args.batches:
            records.clear()
            ms = time_encoder(encoder, ids_for(2000 + rank, batch, args.seq, vocab, device), device, args.repeats)
            a2a = [_Clock.ms(r) for r in records]
            calls = len(hf_moe_opt.optimized_layers(encoder)) * (args.repeats + 2)
            per_batch[batch] = {"ms": ms, "all_to_all_ms_per_layer_call": sum(a2a) / max(calls, 1)}
        balance = plan.evaluate(trace)["overall"]
        results[strategy] = {
            "max_abs_err_vs_one_gpu": error,
            "mean_abs_err_vs_one_gpu": diff.mean().item(),
            "tokens_moved_over_1pct": moved,
            "batches": per_batch,
            "profiled_balance": balance,
        }
        say(
            f"[{strategy}] err max {error:.2e} mean {diff.mean().item():.2e}, tokens moved > 1%: {moved:.3f}, "
            f"profiled max/mean {balance['avg_max_over_mean']:.3f}",
            flush=True,
        )
        del model, encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gathered = [None] * world
    dist.all_gather_object(gathered, {"one_gpu": one_gpu, "results": results})
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"ceilings": ceilings, **summarize(args, world, gathered, floors, ceilings)}


def ep_floor_ms(floor: dict, world: int, ceilings: dict) -> float:
    """Lower bound of one expert-parallel step from the one-GPU counts of rank 0's batch (module docs)."""
    gib = 2**30
    read = (floor["read_gib"] - floor["expert_read_gib"] + floor["expert_read_gib"] / world) * gib
    return 1e3 * max(read / memory_bandwidth(ceilings), floor["tflop"] * 1e12 / ceilings["bf16_flops_per_s"])


def summarize(args, world: int, ranks: list[dict], floors: dict, ceilings: dict) -> dict:
    tokens = {b: b * args.seq for b in args.batches}
    out = {"world_size": world, "one_gpu": {}, "strategies": {}}
    for b in args.batches:
        ms = max(r["one_gpu"][b] for r in ranks)
        out["one_gpu"][str(b)] = {
            "ms": ms,
            "tokens_per_s": tokens[b] / (ms * 1e-3),
            "floor": floors[b],
            "x_floor": ms / floors[b]["floor_ms"],
        }
    for strategy in args.strategies:
        rows = {}
        for b in args.batches:
            per_rank = [r["results"][strategy]["batches"][b] for r in ranks]
            slowest = max(p["ms"] for p in per_rank)
            floor = ep_floor_ms(floors[b], world, ceilings)
            rows[str(b)] = {
                "ms_per_rank": [p["ms"] for p in per_rank],
                "floor_ms": floor,
                "x_floor": slowest / floor,
                "tokens_per_s": world * tokens[b] / (slowest * 1e-3),
                "all_to_all_ms_per_layer_call": [p["all_to_all_ms_per_layer_call"] for p in per_rank],
            }
        out["strategies"][strategy] = {
            "batches": rows,
            "max_abs_err_vs_one_gpu": max(r["results"][strategy]["max_abs_err_vs_one_gpu"] for r in ranks),
            "mean_abs_err_vs_one_gpu": max(r["results"][strategy]["mean_abs_err_vs_one_gpu"] for r in ranks),
            "tokens_moved_over_1pct": max(r["results"][strategy]["tokens_moved_over_1pct"] for r in ranks),
            "profiled_balance": ranks[0]["results"][strategy]["profiled_balance"],
        }
    if {"round_robin", "greedy"} <= set(args.strategies):
        out["greedy_over_round_robin"] = {
            str(b): out["strategies"]["greedy"]["batches"][str(b)]["tokens_per_s"]
            / out["strategies"]["round_robin"]["batches"][str(b)]["tokens_per_s"]
            for b in args.batches
        }
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    batches = list(result["one_gpu"])
    ax.plot(batches, [result["one_gpu"][b]["tokens_per_s"] / 1e3 for b in batches], marker="o", label="one GPU")
    for strategy, entry in result["strategies"].items():
        values = [entry["batches"][b]["tokens_per_s"] / 1e3 for b in batches]
        ax.plot(batches, values, marker="o", label=f"{result['world_size']} ranks, {strategy}")
    ax.set(xlabel=f"batch (x {result['seq']} tokens per rank)", ylabel="k tokens/s", title=result["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=json_out, default="benchmarks/results/ep_scaling.json")
    p.add_argument("--layers", type=int, default=4, help="encoder layers (the real model has 24)")
    p.add_argument("--sparse-step", type=int, default=2, help="every n-th encoder layer is sparse (real: 4)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--strategies", nargs="+", default=["round_robin", "greedy"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="expert compute")
    p.add_argument("--profile-batches", type=int, default=4)
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--timeout", type=int, default=600, help="process-group timeout, s")
    p.add_argument("--ranks", type=int, default=2, help="--smoke: CPU processes to launch")
    p.add_argument("--smoke", action="store_true", help="tiny model, gloo on the CPU (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.seq, args.repeats = [2, 4], 16, 2
        args.layers = min(args.layers, 2)
        args.sparse_step = min(args.sparse_step, 1)
    if "RANK" in os.environ:  # under torchrun
        summary = worker(args)
        if summary is not None:
            finish(args, summary)
        return 0
    if not args.smoke:
        print("run under torchrun (see the module docstring), or with --smoke on the CPU")
        return 1
    # --smoke: relaunch under torchrun with CPU processes.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
    cmd += [str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
    subprocess.run(cmd, check=True, timeout=args.timeout)
    return 0


def finish(args, summary: dict) -> None:
    result = {
        "command": " ".join(sys.argv),
        "environment": environment(),
        "smoke": args.smoke,
        "model": MODEL,
        "title": f"{MODEL} encoder ({args.layers} layers, every {args.sparse_step}th sparse), expert parallel",
        "layers": args.layers,
        "sparse_step": args.sparse_step,
        "seq": args.seq,
        **summary,
    }
    for b, row in result["one_gpu"].items():
        line = [
            f"batch {b}: one GPU {row['tokens_per_s'] / 1e3:.1f}k tok/s, {row['ms']:.2f} ms "
            f"(floor {row['floor']['floor_ms']:.2f} ms, {row['floor']['floor_bound']}-bound, {row['x_floor']:.2f}x)"
        ]
        for strategy, entry in result["strategies"].items():
            r = entry["batches"][b]
            a2a = max(r["all_to_all_ms_per_layer_call"])
            line.append(
                f"{strategy} {r['tokens_per_s'] / 1e3:.1f}k tok/s, {max(r['ms_per_rank']):.2f} ms "
                f"(floor {r['floor_ms']:.2f} ms, {r['x_floor']:.2f}x; all-to-all {a2a:.3f} ms/layer call)"
            )
        print("; ".join(line), flush=True)
    save_result(result, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
