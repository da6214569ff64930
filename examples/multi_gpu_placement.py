"""Multi-GPU expert placement: profile the routing, plan a balanced placement, run the model on it.

Runs offline on the shipped Switch model::

    python examples/multi_gpu_placement.py                        # 2 GPUs if visible, else ["cpu", "cpu"]
    python examples/multi_gpu_placement.py --devices cuda:0 cuda:1 --dtype bfloat16
    python examples/multi_gpu_placement.py --save-plan plan.json  # keep the plan for later runs

Steps:

1. ``trace = hf_moe_opt.profile(model, batches)`` records how many tokens every expert of every MoE
   layer receives in each batch (and which experts fire together);
2. the trace is split by batch into a history to plan from and a held-out part to judge the plans;
3. ``hf_moe_opt.plan_placement(history, 2, strategy)`` for every strategy (``round_robin``, the
   load-blind baseline; ``greedy`` and ``anticorrelation``, the paper's; ``replicate``, copies of hot
   experts in one spare slot per device), and ``plan.evaluate(held_out)`` gives the busiest device's
   load over the mean load per batch (1.0 is perfect balance);
4. ``hf_moe_opt.optimize(model, placement=plan, devices=[...])`` spreads each layer's experts over
   the devices of this one process; tokens travel to their expert's device and back. The outputs
   are compared with the single-device optimized model.

Without two GPUs the two plan devices are both ``"cpu"``: the same code path (token exchange,
replica shares, combine) runs, just without the speed-up. For a model that does not fit on one GPU,
load it spread by the plan instead of moving it::

    with accelerate.init_empty_weights():
        skeleton = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(name))
    device_map = plan.device_map(skeleton, dtype=torch.bfloat16)   # dense by accelerate, experts by the plan
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.bfloat16, device_map=device_map)
    hf_moe_opt.optimize(model, placement=plan)

Several processes (``torchrun``): see ``examples/expert_parallel.py``.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.placement import STRATEGIES

SENTENCES = [
    "A small library for reading and writing configuration files.",
    "Fast image viewer with support for many file formats.",
    "Tools to manage the network interfaces of a laptop.",
    "This package contains the documentation for the command line tool.",
    "The server sends a message to every client when the database changes.",
    "Fonts with a clean design for reading on small screens.",
    "A plugin that adds spell checking to the text editor.",
    "Development files for the audio decoding library.",
    "A game in which the player builds cities on an island.",
    "Command line utility to convert between several archive formats.",
    "The daemon watches a directory and starts a job for every new file.",
    "Python bindings for the graphics toolkit.",
    "A simple calendar application with reminders and alarms.",
    "Translations of the manual pages into several languages.",
    "This metapackage installs the complete desktop environment.",
    "A backup program that stores encrypted copies on a remote machine.",
]


def span_corruption_batch(tok, rng: random.Random, batch_size: int) -> dict:
    """Sentences with one word masked by ``<extra_id_0>``; the label is the masked word."""
    inputs, targets = [], []
    for text in rng.sample(SENTENCES, batch_size):
        words = text.split()
        i = rng.randrange(len(words))
        inputs.append(" ".join(words[:i] + ["<extra_id_0>"] + words[i + 1 :]))
        targets.append(f"<extra_id_0> {words[i]} <extra_id_1>")
    batch = tok(inputs, text_target=targets, return_tensors="pt", padding=True)
    batch["labels"][batch["labels"] == tok.pad_token_id] = -100
    return dict(batch)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(shipped_model_path("switch-tiny-ddtp")), help="path or hub name")
    parser.add_argument(
        "--devices",
        nargs="+",
        default=None,
        help="the devices to spread the experts over (default: cuda:0 cuda:1 if visible, else cpu cpu)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", type=int, default=16, help="batches to profile (half of them held out)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--strategy", default="replicate", choices=list(STRATEGIES), help="the plan the model runs with at the end"
    )
    parser.add_argument("--save-plan", default=None, help="write the chosen plan as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices is None:
        if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
            args.devices = ["cuda:0", "cuda:1"]
        else:
            args.devices = ["cpu", "cpu"]
            print("fewer than 2 GPUs visible: both plan devices are 'cpu' (same code path, no speed-up)")
    num_devices = len(args.devices)
    home = torch.device(args.devices[0])

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(home).eval()
    rng = random.Random(0)
    batches = [span_corruption_batch(tok, rng, args.batch_size) for _ in range(args.batches)]

    # 1. Routing profile (the model is optimized for the run and restored afterwards).
    start = time.perf_counter()
    trace = hf_moe_opt.profile(model, batches, progress=False)
    print(
        f"profiled {trace.num_batches()} batches of {args.batch_size} in {time.perf_counter() - start:.2f} s: "
        f"{len(trace.layers)} MoE layers, {trace.num_experts} experts each"
    )
    for layer in trace.layers:
        share = trace.mean_load(layer) / max(trace.mean_load(layer).sum(), 1e-12)
        print(f"  {layer:32s} token share per expert: {' '.join(f'{s:.2f}' for s in share)}")

    # 2. Plan from the first half, judge on the second.
    history, held_out = trace.split(0.5)
    print(
        f"\nheld-out busiest-device load / mean load over {num_devices} devices "
        f"({held_out.num_batches()} batches x {len(held_out.layers)} layers):"
    )
    print(f"  {'strategy':16s} {'avg':>6s} {'worst':>6s}")
    plans = {}
    for strategy in STRATEGIES:
        spare = 1 if strategy == "replicate" else 0
        plan = hf_moe_opt.plan_placement(history, num_devices, strategy, spare)
        overall = plan.evaluate(held_out)["overall"]
        plans[strategy] = plan
        print(f"  {strategy:16s} {overall['avg_max_over_mean']:6.3f} {overall['worst_max_over_mean']:6.3f}")

    # 3. Run the model spread by the chosen plan and compare with one device.
    plan = plans[args.strategy]
    layer = plan.layer_names[0]
    print(f"\nplan {args.strategy!r}, layer {layer}:")
    for d in range(num_devices):
        print(f"  device {d} ({args.devices[d]}): experts {plan.experts_on(layer, d)}")
    for e in range(plan.num_experts(layer)):
        reps = plan.replicas(layer, e)
        if len(reps) > 1:
            split = ", ".join(f"{share:.2f} on device {d}" for d, share in reps)
            print(f"  expert {e} is replicated: {split}")
    if args.save_plan:
        print(f"plan written to {plan.save(args.save_plan)}")

    reference = hf_moe_opt.optimize(copy.deepcopy(model))
    hf_moe_opt.optimize(model, placement=plan, devices=args.devices)
    check = {k: v.to(home) for k, v in span_corruption_batch(tok, random.Random(1), args.batch_size).items()}
    with torch.no_grad():
        want = reference(**check).logits
        got = model(**check).logits
        tokens_ref = reference.generate(
            input_ids=check["input_ids"], attention_mask=check["attention_mask"], max_new_tokens=12, do_sample=False
        )
        tokens = model.generate(
            input_ids=check["input_ids"], attention_mask=check["attention_mask"], max_new_tokens=12, do_sample=False
        )
    error = (got.float() - want.float()).abs().max().item()
    same = tokens.shape == tokens_ref.shape and torch.equal(tokens.cpu(), tokens_ref.cpu())
    print(
        f"\noptimize(model, placement=plan, devices={args.devices}): max |placed - one device| = {error:.2e}, "
        f"generated tokens identical: {same}"
    )
    if args.dtype == "float32" and (error > 1e-4 or not same):
        print("the placed model deviates from the single-device model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
