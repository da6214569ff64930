"""How close an online eviction policy can get to Belady on the synthetic traces (CPU; no GPU needed).

    python benchmarks/policy_bounds.py --out benchmarks/results/policy_bounds.json

Each setting is drawn with several seeds (``--seeds``; the first two are the ones the shipped
policies' defaults were chosen on, the others are held out), with 25% of the experts resident.
Beside Belady and the shipped ``lfu``/``lfru``/``adaptive``, two policies that are not shipped:

* ``oracle_next`` -- told the distribution the generator draws the *next* step from (what no online
  policy can know), it evicts the expert least likely to be drawn. Its gap to Belady is what is left
  for the future beyond one step, an estimate of how far any online policy stays from Belady;
* ``lfru_ensemble`` -- shadow caches of ``lfru`` with several half-lives; the real cache evicts by the
  ranking of the shadow with the most hits over a recent window (adapting the half-life online).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_moe_opt.benchmarking.common import environment  # noqa: E402
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
SHIPPED = ("lfu", "lfru", "adaptive")


def _row(job: tuple[str, int, int]) -> dict:
    setting, seed, steps = job
    e, k, tokens, zipf, sticky, reshuffle = SETTINGS[setting]
    drawn = list(synthetic_steps(e, k, tokens, steps, zipf, sticky, reshuffle, seed))
    trace = RoutingTrace(tuple(s for s, _, _ in drawn), tuple(c for _, c, _ in drawn), e)
    slots = e // 4  # 25% resident
    rates = {name: simulate(trace, name, slots).hit_rate for name in ("belady", *SHIPPED)}
    rates["oracle_next"] = _replay(OracleNext(slots, e, [m for _, _, m in drawn]), trace)
    rates["lfru_ensemble"] = _replay(LFRUEnsemble(slots, e), trace)
    gaps = {k: round(rates["belady"] - v, 4) for k, v in rates.items() if k != "belady"}
    title = (f"{e} experts, top-{k}, {tokens} tokens/step, zipf {zipf}, stickiness {sticky}, "
             f"reshuffle {reshuffle}, seed {seed}")  # fmt: skip
    return {"setting": setting, "seed": seed, "trace": title, "slots": slots, "hit_rate": rates, "belady_minus": gaps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/policy_bounds.json")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1: run in this process)")
    args = p.parse_args(argv)
    jobs = [(setting, seed, args.steps) for setting in args.settings for seed in args.seeds]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_row, jobs))
    else:
        rows = [_row(job) for job in jobs]
    summary = {}
    for setting in args.settings:
        gaps = [r["belady_minus"] for r in rows if r["setting"] == setting]
        summary[setting] = {
            name: {"mean": round(sum(g[name] for g in gaps) / len(gaps), 4), "max": max(g[name] for g in gaps)}
            for name in gaps[0]
        }
        print(f"{setting} (Belady minus policy at 25% resident, mean / max over seeds {args.seeds}):")
        print("    " + ", ".join(f"{k} {v['mean']:.3f} / {v['max']:.3f}" for k, v in summary[setting].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "environment": environment(), "summary": summary, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
