"""Switch Transformers top-1 routing.

Semantics (transformers 4.57 / >= 5.23): softmax in the router dtype, cast to the input dtype;
expert = argmax of those probabilities, gate = their max. Capacity counts per *sequence*: a token
is kept while the number of tokens of its sequence routed to its expert, itself included, is at
most ``expert_capacity`` (earlier positions win). Dropped tokens get 0 from the block.
"""

from __future__ import annotations

import torch

from .types import Routing


def switch_route(logits: torch.Tensor, input_dtype: torch.dtype, capacity: int | None) -> Routing:
    """Route ``[B, S, E]`` logits; returns ``[B*S, 1]`` routing. ``capacity=None`` drops nothing."""
    if logits.dim() != 3:
        raise ValueError(f"Switch routing expects [batch, seq, experts] logits, got {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype).to(input_dtype)
    expert = probs.argmax(dim=-1, keepdim=True)  # [B, S, 1]
    gate = probs.gather(-1, expert)
    if capacity is None:
        keep = torch.ones_like(expert, dtype=torch.bool)
    else:
        # Position of each token within its expert's queue, per sequence (1-based). A scatter builds the
        # one-hot: F.one_hot checks its input range on the host.
        onehot = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device).scatter_(-1, expert, 1)
        position = torch.cumsum(onehot, dim=1).gather(-1, expert)
        keep = position <= capacity
    return Routing(expert.reshape(-1, 1), gate.reshape(-1, 1), keep.reshape(-1, 1))
