"""How close an online eviction policy can get to Belady on the synthetic traces (CPU; no GPU needed).

    python benchmarks/policy_bounds.py --out benchmarks/results/policy_bounds.json

Each setting is drawn with several seeds (``--seeds``; the first two are the ones the shipped
policies' defaults were chosen on, the others are held out), with 25% of the experts resident.
Settings: ``synthetic_trace`` draws, and the first layer's routing of ``bench_cache.py``'s MoE-only
stacks (a random router of the layer's shape over that script's sticky stream of Zipf-popular
prototype tokens; each seed its own router and stream), whose timed runs see only 150 steps.
``changepoint``'s defaults were chosen on seeds 0-3. Beside Belady and the shipped
``lfu``/``lfru``/``adaptive``/``changepoint``, three policies that are not shipped:

* ``oracle_next`` -- told the distribution the generator draws the *next* step from (what no online
  policy can know), it evicts the expert least likely to be drawn (synthetic settings only). Its
  gap to Belady is what is left for the future beyond one step, an estimate of how far any online
  policy stays from Belady;
* ``told_changes`` -- told the steps at which the popularity reshuffles, not the new popularity: LFU
  over the uses since the last reshuffle (a continued use counts 0.3, as in the shipped policies;
  synthetic settings only). A policy that detected every change at once and then learnt the new
  popularity from the routing could do about this well, so its gap to Belady is roughly what any
  policy that learns from the routing alone must give up;
* ``lfru_ensemble`` -- shadow caches of ``lfru`` with several half-lives; the real cache evicts by the
  ranking of the shadow with the most hits over a recent window (adapting the half-life online).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cache import token_stream  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from hf_moe_opt.benchmarking.common import LAYER_SHAPES, environment, json_out, save_result  # noqa: E402
from hf_moe_opt.cache import simulate  # noqa: E402
from hf_moe_opt.cache.policies import EvictionPolicy, LFRUPolicy  # noqa: E402
from hf_moe_opt.cache.traces import RoutingTrace, synthetic_steps  # noqa: E402


class OracleNext(EvictionPolicy):
    """Evicts the candidate with the smallest probability in the next step's draw distribution."""

    name = "oracle_next"

    def __init__(self, num_slots: int, num_experts: int, mixes: list) -> None:
        self._mixes = mixes
        super().__init__(num_slots, num_experts)

    def _choose_victim(self, candidates: list[int]) -> int:
        nxt = self._mixes[min(self._step + 1, len(self._mixes) - 1)]
        return min(candidates, key=lambda e: float(nxt[e]))


class ToldChanges(EvictionPolicy):
    """LFU over the uses since the last popularity reshuffle, whose steps it is told."""

    name = "told_changes"

    def __init__(self, num_slots: int, num_experts: int, reshuffle_every: int | None) -> None:
        self._every = reshuffle_every
        super().__init__(num_slots, num_experts)

    def _reset_history(self) -> None:
        self._count = [0.0] * self.num_experts
        self._prev: set[int] = set()
        self._last_use: dict[int, int] = {}

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        if self._every and self._step % self._every == 0:
            self._count = [0.0] * self.num_experts
        for e in order:
            self._count[e] += 0.3 if e in self._prev else 1.0
        self._prev = set(order)

    def _on_use(self, expert: int, tick: int, count: int | None) -> None:
        self._last_use[expert] = tick

    def _choose_victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self._count[e], self._last_use.get(e, -1)))


class LFRUEnsemble(EvictionPolicy):
    """Evicts by the ranking of whichever ``lfru`` shadow cache hit most over the last ``window`` steps."""

    name = "lfru_ensemble"

    def __init__(self, num_slots: int, num_experts: int, half_lives=(2, 8, 32, 128), window: float = 32.0):
        self._half_lives, self._decay = tuple(half_lives), 0.5 ** (1.0 / window)
        super().__init__(num_slots, num_experts)

    def _reset_history(self) -> None:
        self._shadows = [LFRUPolicy(self.num_slots, self.num_experts, half_life=h) for h in self._half_lives]
        self._merit = [0.0] * len(self._shadows)
        self._best = 0

    def _begin_step(self, order: list[int], counts: dict[int, int] | None) -> None:
        step_counts = None if counts is None else [counts[e] for e in order]
        for i, shadow in enumerate(self._shadows):
            hits = len(shadow.step(order, step_counts).hits)
            self._merit[i] = self._merit[i] * self._decay + hits
        self._best = max(range(len(self._shadows)), key=self._merit.__getitem__)

    def _choose_victim(self, candidates: list[int]) -> int:
        shadow = self._shadows[self._best]
        return min(candidates, key=lambda e: (shadow.score(e), shadow._last_use.get(e, -1)))


def _replay(policy: EvictionPolicy, trace: RoutingTrace) -> float:
    hits = total = 0
    for step, counts in zip(trace.steps, trace.counts, strict=True):
        out = policy.step(step, counts)
        hits += len(out.hits)
        total += len(out.hits) + len(out.misses)
    return hits / total


# name: (num_experts, top_k, tokens per step, zipf exponent, stickiness, steps between popularity reshuffles)
SETTINGS = {
    "reshuffle 200": (64, 2, 8, 1.0, 0.5, 200),
    "fixed popularity": (64, 2, 8, 1.0, 0.5, None),
    "reshuffle 100": (64, 2, 8, 1.0, 0.5, 100),
    "reshuffle 500": (64, 2, 8, 1.0, 0.5, 500),
    "zipf 0.8, reshuffle 200": (64, 2, 8, 0.8, 0.5, 200),
    "zipf 1.2, reshuffle 200": (64, 2, 8, 1.2, 0.5, 200),
    "128 experts, top-1, stickiness 0.6": (128, 1, 8, 1.0, 0.6, None),
    "128 experts, top-1, reshuffle 200": (128, 1, 8, 1.0, 0.5, 200),
}
# name: (layer shape, batch): a bench_cache.py MoE-only stack's first layer, decode steps of ``batch`` tokens.
STACKS = {
    "nllb-moe-54b stack, batch 1": ("nllb-moe-54b", 1),
    "nllb-moe-54b stack, batch 8": ("nllb-moe-54b", 8),
    "switch-base-128 stack, batch 1": ("switch-base-128", 1),
    "switch-base-128 stack, batch 8": ("switch-base-128", 8),
}
SHIPPED = ("lfu", "lfru", "adaptive", "changepoint")


@torch.no_grad()
def stack_trace(shape: str, batch: int, steps: int, seed: int) -> RoutingTrace:
    """The routing of a random ``nn.Linear`` router of ``shape`` over ``bench_cache.token_stream``."""
    e, d, _, k = LAYER_SHAPES[shape]
    torch.manual_seed(seed)
    router = torch.nn.Linear(d, e, bias=False)
    rows = []
    for x in token_stream(d, batch, steps, torch.device("cpu"), seed=seed):
        chosen = router(x.view(batch, d).float()).topk(k, dim=-1).indices.reshape(-1)
        experts, counts = torch.unique(chosen, return_counts=True)
        rows.append((tuple(experts.tolist()), tuple(counts.tolist())))
    return RoutingTrace(tuple(r[0] for r in rows), tuple(r[1] for r in rows), e)


def _row(job: tuple[str, int, int]) -> dict:
    setting, seed, steps = job
    if setting in STACKS:
        shape, batch = STACKS[setting]
        trace, drawn = stack_trace(shape, batch, steps, seed), None
        title = f"{setting}: {shape} router, bench_cache token stream, seed {seed}"
    else:
        e, k, tokens, zipf, sticky, reshuffle = SETTINGS[setting]
        drawn = list(synthetic_steps(e, k, tokens, steps, zipf, sticky, reshuffle, seed))
        trace = RoutingTrace(tuple(s for s, _, _ in drawn), tuple(c for _, c, _ in drawn), e)
        title = (f"{e} experts, top-{k}, {tokens} tokens/step, zipf {zipf}, stickiness {sticky}, "
                 f"reshuffle {reshuffle}, seed {seed}")  # fmt: skip
    e = trace.num_experts
    slots = e // 4  # 25% resident
    rates = {name: simulate(trace, name, slots).hit_rate for name in ("belady", *SHIPPED)}
    if drawn is not None:
        rates["oracle_next"] = _replay(OracleNext(slots, e, [m for _, _, m in drawn]), trace)
        rates["told_changes"] = _replay(ToldChanges(slots, e, SETTINGS[setting][5]), trace)
    rates["lfru_ensemble"] = _replay(LFRUEnsemble(slots, e), trace)
    gaps = {k: round(rates["belady"] - v, 4) for k, v in rates.items() if k != "belady"}
    return {"setting": setting, "seed": seed, "trace": title, "slots": slots, "hit_rate": rates, "belady_minus": gaps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=json_out, default="benchmarks/results/policy_bounds.json")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    names = [*SETTINGS, *STACKS]
    p.add_argument("--settings", nargs="+", choices=names, default=names)
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1: run in this process)")
    args = p.parse_args(argv)
    jobs = [(setting, seed, args.steps) for setting in args.settings for seed in args.seeds]
    with ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(args.jobs)) if args.jobs > 1 else None
        done = pool.map(_row, jobs) if pool is not None else map(_row, jobs)
        rows = list(tqdm(done, total=len(jobs), desc="traces", unit="trace", dynamic_ncols=True))
    summary = {}
    for setting in args.settings:
        gaps = [r["belady_minus"] for r in rows if r["setting"] == setting]
        summary[setting] = {
            name: {"mean": round(sum(g[name] for g in gaps) / len(gaps), 4), "max": max(g[name] for g in gaps)}
            for name in gaps[0]
        }
        print(f"{setting} (Belady minus policy at 25% resident, mean / max over seeds {args.seeds}):")
        print("    " + ", ".join(f"{k} {v['mean']:.3f} / {v['max']:.3f}" for k, v in summary[setting].items()))
    save_result({"environment": environment(), "summary": summary, "rows": rows}, args.out, plot)
    return 0


def plot(result: dict, path: Path) -> None:
    """Belady minus each policy per setting (mean over seeds, worst as a tick), the 5-point target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["summary"])
    names = list(dict.fromkeys(n for s in settings for n in result["summary"][s]))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(settings) + 2), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, s in enumerate(settings) if name in result["summary"][s]]
        got = [result["summary"][s][name] for s in settings if name in result["summary"][s]]
        ax.bar(xs, [100 * g["mean"] for g in got], width, label=name)
        ax.plot(xs, [100 * g["max"] for g in got], "k_", markersize=5)
    ax.axhline(5.0, color="red", linestyle="--", linewidth=1, label="target: 5 points")
    ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Belady minus policy, points of hit rate")
    ax.set_title("25% of experts resident: gap to Belady (bars: mean over seeds, ticks: worst)", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
