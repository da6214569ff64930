"""How close an online eviction policy can get to Belady on the synthetic traces (CPU; no GPU needed).

    python benchmarks/policy_bounds.py --out benchmarks/results/policy_bounds.json

Beside Belady and the shipped ``lfu``/``lfru``, two policies that are not shipped:

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/policy_bounds.json")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    rows = []
    for reshuffle in (None, 200):
        for seed in args.seeds:
            drawn = list(synthetic_steps(64, 2, 8, args.steps, 1.0, 0.5, reshuffle, seed))
            trace = RoutingTrace(tuple(s for s, _, _ in drawn), tuple(c for _, c, _ in drawn), 64)
            slots = 16  # 25% resident
            rates = {name: simulate(trace, name, slots).hit_rate for name in ("belady", "lfu", "lfru")}
            rates["oracle_next"] = _replay(OracleNext(slots, 64, [m for _, _, m in drawn]), trace)
            rates["lfru_ensemble"] = _replay(LFRUEnsemble(slots, 64), trace)
            gaps = {k: round(rates["belady"] - v, 4) for k, v in rates.items() if k != "belady"}
            title = f"64 experts, top-2, 8 tokens/step, zipf 1.0, stickiness 0.5, reshuffle {reshuffle}, seed {seed}"
            rows.append({"trace": title, "slots": slots, "hit_rate": rates, "belady_minus": gaps})
            print(f"{title}: Belady {rates['belady']:.3f}; gaps " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "environment": environment(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
