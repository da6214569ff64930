"""NLLB-MoE top-2 routing (the fairseq / transformers 4.57 semantics).

- probabilities: softmax of the float32 logits, cast to the input dtype;
- first expert: argmax of the probabilities; second: argmax of the logits with the first masked
  (``second_expert_policy="sampling"`` adds Gumbel noise to those logits first);
- ``normalize_before``: gates normalised to sum to 1 before capacity dropping, else after it;
- ``"random"`` policy: the second expert is kept with probability ``min(1, 2 * p2)``, ``p2`` its raw
  probability; with ``normalize_before`` that raw probability is also its gate (transformers reads
  it back after normalising, so the second gate is not renormalised under this policy);
- padding tokens are removed from routing (they take no capacity and get 0);
- capacity counts over the flattened batch; second choices queue behind all first choices of
  the same expert; ``batch_prioritized`` orders each queue by the token's top probability
  (descending, ties by position) instead of by position.
"""

from __future__ import annotations

import torch

from .queue import queue_positions
from .types import Routing

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


def _normalize(p1: torch.Tensor, p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    denom = torch.clamp(p1 + p2, min=torch.finfo(p1.dtype).eps)
    return p1 / denom, p2 / denom


def _queue(expert: torch.Tensor, keep: torch.Tensor, num_experts: int, order: torch.Tensor | None):
    """0-based position of each kept token in its expert's queue (tokens taken in ``order``), and each
    expert's kept count."""
    key = torch.where(keep, expert, num_experts)
    if order is None:
        return queue_positions(key, num_experts)
    ranked, counts = queue_positions(key[order], num_experts)
    positions = torch.empty_like(ranked)
    positions[order] = ranked
    return positions, counts


def nllb_route(
    logits: torch.Tensor,
    input_dtype: torch.dtype,
    *,
    capacity: int | None,
    padding: torch.Tensor | None = None,
    second_expert_policy: str = "all",
    normalize_before: bool = False,
    batch_prioritized: bool = False,
) -> Routing:
    """Route ``[N, E]`` float logits; returns ``[N, 2]`` routing. ``capacity=None`` drops nothing."""
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}")
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype).to(input_dtype)
    top1 = probs.argmax(dim=-1)
    second_logits = logits
    if second_expert_policy == "sampling":
        uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
        second_logits = logits - torch.log(-torch.log(uniform))
    top2 = second_logits.scatter(1, top1[:, None], float("-inf")).argmax(dim=-1)
    p1 = probs.gather(1, top1[:, None]).squeeze(1)
    p2 = raw2 = probs.gather(1, top2[:, None]).squeeze(1)
    if normalize_before:
        p1, p2 = _normalize(p1, p2)

    # With two or more experts a token's choices are distinct, so no queue exceeds num_tokens.
    capacity_binds = capacity is not None and (capacity < num_tokens or num_experts == 1)
    if second_expert_policy != "random" and padding is None and not capacity_binds:
        # Nothing can be dropped: no masks (the common decode case).
        if not normalize_before:
            p1, p2 = _normalize(p1, p2)
        return Routing(torch.stack([top1, top2], dim=1), torch.stack([p1, p2], dim=1), None)

    keep1 = torch.ones(num_tokens, dtype=torch.bool, device=logits.device)
    keep2 = keep1
    if second_expert_policy == "random":
        p2 = raw2
        keep2 = (2 * raw2) > torch.rand_like(raw2, dtype=torch.float32)
    if padding is not None:
        keep1 = keep1 & ~padding
        keep2 = keep2 & ~padding
    if capacity_binds:
        order = None
        if batch_prioritized:
            order = torch.sort(probs.max(dim=-1).values, descending=True, stable=True).indices
        loc1, first_counts = _queue(top1, keep1, num_experts, order)
        loc2, _ = _queue(top2, keep2, num_experts, order)
        loc2 = loc2 + first_counts[top2]
        keep1 = keep1 & (loc1 < capacity)
        keep2 = keep2 & (loc2 < capacity)

    zero = torch.zeros((), dtype=p1.dtype, device=p1.device)
    g1 = torch.where(keep1, p1, zero)
    g2 = torch.where(keep2, p2, zero)
    if not normalize_before:
        g1, g2 = _normalize(g1, g2)
    return Routing(torch.stack([top1, top2], dim=1), torch.stack([g1, g2], dim=1), torch.stack([keep1, keep2], dim=1))
