"""Switch Transformers top-1 routing.

Semantics (transformers 4.57 / >= 5.23): softmax in the router dtype, cast to the input dtype;
expert = argmax of those probabilities, gate = their max. Capacity counts per *sequence*: a token
is kept while the number of tokens of its sequence routed to its expert, itself included, is at
most ``expert_capacity`` (earlier positions win). Dropped tokens get 0 from the block.
"""

from __future__ import annotations

import torch

from .queue import queue_positions
from .types import Routing


def switch_route(logits: torch.Tensor, input_dtype: torch.dtype, capacity: int | None) -> Routing:
    """Route ``[B, S, E]`` logits; returns ``[B*S, 1]`` routing. ``capacity=None`` drops nothing."""
    if logits.dim() != 3:
        raise ValueError(f"Switch routing expects [batch, seq, experts] logits, got {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype).to(input_dtype)
    expert = probs.argmax(dim=-1, keepdim=True)  # [B, S, 1]
    gate = probs.gather(-1, expert)
    if capacity is None or logits.shape[1] <= capacity:
        # No sequence can overflow an expert: skip the queue bookkeeping (decode steps land here).
        return Routing(expert.reshape(-1, 1), gate.reshape(-1, 1), None)
    # One queue per (sequence, expert): key = sequence * E + expert.
    batch, seq, num_experts = logits.shape
    sequence = torch.arange(batch, device=logits.device)[:, None, None]
    position, _ = queue_positions((sequence * num_experts + expert).reshape(-1), batch * num_experts)
    keep = (position < capacity).view(batch, seq, 1)
    return Routing(expert.reshape(-1, 1), gate.reshape(-1, 1), keep.reshape(-1, 1))
