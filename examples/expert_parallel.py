"""Expert parallelism with torchrun: every rank holds a share of the experts of a small MoE model.

CPU (gloo), two processes::

    torchrun --nproc_per_node 2 examples/expert_parallel.py

GPUs (NCCL), one process per GPU::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 examples/expert_parallel.py --device cuda

Each rank builds the same model (same seed; a real run would call ``from_pretrained``), profiles
the routing on a few batches, plans a balanced placement, then shards the experts with
``hf_moe_opt.optimize(model, expert_parallel=True, placement=plan)`` and checks its own batch
against the single-process optimized model (logits equal to float rounding, generated tokens
identical). Every rank must call the model the same number of
times (here: the same number of forward passes, and ``max_new_tokens`` with ``min_new_tokens``
equal to it, so that no rank stops generating early).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

import hf_moe_opt


def build_model(num_experts: int) -> SwitchTransformersForConditionalGeneration:
    torch.manual_seed(0)
    config = SwitchTransformersConfig(
        vocab_size=128,
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_experts=num_experts,
        expert_capacity=64,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():  # decisive, varied routing for a randomly initialised model
        for name, p in model.named_parameters():
            if "router.classifier" in name:
                p.normal_(0.0, 1.0)
    return model


def batch_for(seed: int, device: torch.device, batch: int = 4, length: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, 128, (batch, length), generator=g).to(device),
        "decoder_input_ids": torch.randint(2, 128, (batch, 8), generator=g).to(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--strategy", default="replicate", choices=list(hf_moe_opt.placement.STRATEGIES))
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    # A dead or stuck rank makes the others fail after this timeout instead of hanging.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(args.num_experts).to(device)
    # Same batches on every rank -> same trace -> same plan (a real run profiles once and loads the plan).
    trace = hf_moe_opt.profile(model, [batch_for(100 + i, device) for i in range(8)], progress=rank == 0)
    spare = 1 if args.strategy == "replicate" else 0
    plan = hf_moe_opt.plan_placement(trace, world, args.strategy, spare)

    reference = hf_moe_opt.optimize(copy.deepcopy(model))
    hf_moe_opt.optimize(model, expert_parallel=True, placement=plan)
    mine = batch_for(1000 + rank, device)  # every rank serves its own requests
    with torch.no_grad():
        got = model(**mine).logits
        want = reference(**mine).logits
        kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
        tokens = model.generate(input_ids=mine["input_ids"], **kw)
        same = torch.equal(tokens, reference.generate(input_ids=mine["input_ids"], **kw))  # local: no collectives
    # The shards compute each expert's rows in other groupings than the single process: equal to rounding.
    error = (got - want).abs().max().item()
    experts = {name: plan.experts_on(name, rank) for name in plan.layer_names}
    first = plan.layer_names[0]
    line = (
        f"rank {rank}/{world}: holds experts {experts[first]} of {first} (and per plan in the other layers); "
        f"max |EP - single process| = {error:.2e}; generated {tuple(tokens.shape)}, identical tokens: {same}\n"
    )
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks' lines never interleave
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
