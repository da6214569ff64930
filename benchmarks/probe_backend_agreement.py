"""How far apart do two correct bf16 runs of the same random-router encoder land?

    PYTHONPATH=$PWD python benchmarks/probe_backend_agreement.py --out benchmarks/results/backend_agreement_h200.json

The 2-rank expert-parallel encoder of ``bench_ep_scaling.py`` (nllb-moe-54b dimensions, random
weights and routers, Triton experts) differed from the one-GPU encoder by up to 0.49 (max abs) on
its check batch. Each rank runs 64 experts, so its kernels take other tile configurations than the
one-GPU layer's 128: bf16 rounding differs, and a random router has near-ties that a rounding
difference can flip, moving a token's output by a whole expert's contribution. This probe measures,
on one GPU and with the same model and check batch as that script, what two *single-GPU* runs that
differ only in rounding give: the encoder with ``backend="torch"`` against ``backend="triton"``,
and both against the float32 model (the truth neither bf16 run reaches). Per pair: the largest and
mean absolute difference, the share of tokens moved by more than 1% of the reference's largest
value. If the rounding-only pair lands where the expert-parallel run did, its difference is
rounding amplified by the routers, not a bug in the exchange.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ep_scaling import build, ids_for  # noqa: E402

import hf_moe_opt  # noqa: E402
from hf_moe_opt.benchmarking.common import environment, json_out, pyplot_or_none, save_result  # noqa: E402


def run(encoder, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """The last hidden state (float32) of ``encoder`` optimized with ``backend``, then restored."""
    hf_moe_opt.optimize(encoder, backend=backend)
    try:
        with torch.no_grad():
            return encoder(input_ids=ids).last_hidden_state.float()
    finally:
        hf_moe_opt.restore(encoder)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs()
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        # Rounding shifts every token a little; a flipped routing decision moves a few tokens a lot.
        "tokens_moved_over_1pct": (diff.amax(-1) > 0.01 * b.abs().amax()).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sparse-step", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny config (checks the script)")
    p.add_argument("--out", type=json_out, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    model, encoder = build(args, device)
    ids = ids_for(1000, args.check_batch, args.seq, model.config.vocab_size, device)
    runs = {b: run(encoder, ids, b) for b in backends}
    # The truth: the same weights in float32 (through the optimized layer with the torch backend:
    # transformers 5.x's own NLLB-MoE expert loop is wrong).
    encoder.float()
    runs["float32"] = run(encoder, ids, "torch")
    pairs = {}
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} vs {b}"] = row = compare(runs[a], runs[b])
            print(
                f"{a} vs {b}: max {row['max_abs']:.3g} mean {row['mean_abs']:.3g}, "
                f"tokens moved > 1%: {row['tokens_moved_over_1pct']:.3f}",
                flush=True,
            )
    if args.out:
        save_result({"environment": environment(), "check_tokens": ids.numel(), "pairs": pairs}, args.out, plot)
    return 0


def plot(result: dict, path: Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    names = list(result["pairs"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [result["pairs"][n]["max_abs"] for n in names], label="max abs difference")
    ax.bar(names, [result["pairs"][n]["mean_abs"] for n in names], label="mean abs difference")
    ax.set(ylabel="abs difference of the last hidden state", yscale="log")
    ax.legend(fontsize=8)
    fig.suptitle(f"nllb-moe-54b encoder, random weights: run vs run, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
