"""Switch Transformers top-1 routing.

Semantics (transformers 4.57 / >= 5.23): softmax in the router dtype, cast to the input dtype;
expert = argmax of those probabilities, gate = their max. Capacity counts per *sequence*: a token
is kept while the number of tokens of its sequence routed to its expert, itself included, is at
most ``expert_capacity`` (earlier positions win). Dropped tokens get 0 from the block.

Two steps, so that the fused Triton router (which makes the choice) and :func:`switch_route` share
the capacity rule: :func:`switch_choice` and :func:`switch_keep`.
"""

from __future__ import annotations

import functools

import torch

from ..compiled_kernels import compiled_kernels
from .queue import queue_positions
from .types import Routing


def switch_choice(logits: torch.Tensor, input_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert, gate)`` ``[..., 1]`` of logits ``[..., E]``: the top-1 of the probabilities in the input dtype."""
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype).to(input_dtype)
    expert = probs.argmax(dim=-1, keepdim=True)
    return expert, probs.gather(-1, expert)


@functools.cache
def _fused_queue():
    """``hf_moe_opt.kernels.queue`` (one launch on CUDA) when Triton compiles for a GPU here, else None."""
    return compiled_kernels("queue")


def switch_keep(expert: torch.Tensor, batch: int, num_experts: int, capacity: int | None) -> torch.Tensor | None:
    """Capacity mask ``[B*S, 1]`` of the experts ``expert`` (``B*S`` entries, sequence-major) of ``batch``
    sequences, or None where nothing can be dropped (``capacity=None`` or sequences no longer than it)."""
    if batch == 0:  # no sequences: nothing to drop
        return None
    seq = expert.numel() // batch
    if capacity is None or seq <= capacity:
        # No sequence can overflow an expert: skip the queue bookkeeping (decode steps land here).
        return None
    fused = _fused_queue() if expert.is_cuda else None
    if fused is not None and fused.fits(num_experts):
        return fused.sequence_keep(expert.reshape(batch, seq), num_experts, capacity).view(-1, 1)
    # One queue per (sequence, expert): key = sequence * E + expert.
    sequence = torch.arange(batch, device=expert.device)[:, None]
    key = sequence * num_experts + expert.reshape(batch, seq)
    position, _ = queue_positions(key.reshape(-1), batch * num_experts)
    return (position < capacity).view(-1, 1)


def switch_route(logits: torch.Tensor, input_dtype: torch.dtype, capacity: int | None) -> Routing:
    """Route ``[B, S, E]`` logits; returns ``[B*S, 1]`` routing. ``capacity=None`` drops nothing."""
    if logits.dim() != 3:
        raise ValueError(f"Switch routing expects [batch, seq, experts] logits, got {tuple(logits.shape)}")
    batch, _, num_experts = logits.shape
    expert, gate = switch_choice(logits, input_dtype)
    keep = switch_keep(expert, batch, num_experts, capacity)
    return Routing(expert.reshape(-1, 1), gate.reshape(-1, 1), keep)
