"""Switch Transformers' per-sequence capacity mask in one Triton launch.

A token is kept while the number of tokens of its sequence routed to its expert, itself included, is
at most the capacity (earlier positions first). In torch that is a stable sort of ``sequence * E +
expert`` keys, a histogram, a cumulative sum and two scatters (about 130 us per layer at 128 x 128
tokens on an H200). Here one program per sequence walks its tokens in blocks, keeps a running count
per expert, and gets each token's place in its expert's queue from a cumulative sum of a one-hot
block: the same mask as :func:`hf_moe_opt.routing.queue.queue_positions`, exactly.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launch import launch, next_power_of_2
from .pdl import launch_options, wait_for_producer

MAX_EXPERTS = 1024
# Elements of the [tokens, experts] one-hot block of one program step.
_TILE = 8192


@triton.jit
def _sequence_keep_kernel(
    expert_ptr,
    keep_ptr,
    seq_len,
    num_experts,
    capacity,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producer(USE_PDL)
    base = tl.program_id(0).to(tl.int64) * seq_len
    e = tl.arange(0, BLOCK_E)
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)  # tokens of this sequence per expert so far
    for s0 in range(0, seq_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        valid = s < seq_len
        expert = tl.load(expert_ptr + base + s, mask=valid, other=num_experts).to(tl.int32)
        hot = (expert[:, None] == e[None, :]).to(tl.int32)
        # Inclusive count of each token's expert up to and including it: its 1-based queue place.
        place = tl.sum(tl.where(hot != 0, tl.cumsum(hot, axis=0) + seen[None, :], 0), axis=1)
        tl.store(keep_ptr + base + s, (place <= capacity).to(tl.uint8), mask=valid)
        seen += tl.sum(hot, axis=0)


def fits(num_experts: int) -> bool:
    """Whether :func:`sequence_keep` handles ``num_experts`` experts."""
    return 0 < num_experts <= MAX_EXPERTS


def sequence_keep(expert: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """``[B, S]`` bool: token ``s`` of sequence ``b`` fits in its expert's capacity.

    Args:
        expert: ``[B, S]`` integer expert of every token, in ``[0, E)``.
        num_experts: ``E``; ``capacity``: tokens per expert and sequence.
    """
    if expert.dim() != 2:
        raise ValueError(f"expected [batch, seq] experts, got {tuple(expert.shape)}")
    if not fits(num_experts):
        raise ValueError(f"sequence_keep handles 1..{MAX_EXPERTS} experts, got {num_experts}")
    batch, seq_len = expert.shape
    keep = torch.empty((batch, seq_len), dtype=torch.bool, device=expert.device)
    if keep.numel() == 0:
        return keep
    expert = expert.contiguous()
    block_e = max(next_power_of_2(num_experts), 16)
    block_s = max(min(_TILE // block_e, next_power_of_2(seq_len)), 16)
    device = expert.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _sequence_keep_kernel,
            (batch,),
            expert,
            keep.view(torch.uint8),
            seq_len,
            num_experts,
            int(capacity),
            BLOCK_S=block_s,
            BLOCK_E=block_e,
            num_warps=4,
            **launch_options(device),
        )
    return keep
