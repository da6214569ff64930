"""Plain reference semantics for the MoE blocks, written from the routing rules in DESIGN.md.

Deliberately slow and literal: per-token Python loops, HF's own expert modules for the expert
MLPs, no sorting tricks. Everything the optimized layer does is compared against this.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _probs(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).to(dtype)


def _logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = router.classifier.weight.float()
    b = None if router.classifier.bias is None else router.classifier.bias.float()
    return nn.functional.linear(x.float(), w, b)


def switch_reference(block: nn.Module, hidden: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Switch sparse MLP: top-1, gate = max prob (input dtype), capacity counted per sequence."""
    batch, seq, _ = hidden.shape
    logits = _logits(block.router, hidden)
    probs = _probs(logits, hidden.dtype)
    out = torch.zeros_like(hidden)
    num_experts = logits.shape[-1]
    for b in range(batch):
        used = [0] * num_experts
        for s in range(seq):
            e = int(torch.argmax(probs[b, s]))
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue  # dropped: the block adds nothing (residual only)
            y = block.experts[f"expert_{e}"](hidden[b, s][None])[0]
            out[b, s] = (y * probs[b, s, e]).to(hidden.dtype)
    return out


def nllb_capacity(router: nn.Module, num_tokens: int, config_capacity: int | None) -> int:
    frac = router.moe_eval_capacity_token_fraction
    if frac > 0:
        return math.ceil(frac * num_tokens)
    return config_capacity if config_capacity is not None else 2 * math.ceil(num_tokens / router.num_experts)


def nllb_reference(
    block: nn.Module,
    hidden: torch.Tensor,
    padding: torch.Tensor | None,
    *,
    capacity: int | None,
    token_dropout: float,
) -> torch.Tensor:
    """NLLB-MoE sparse MLP, deterministic ("all") second-expert policy.

    ``padding``: ``[B, S]`` bool, True for padding tokens (removed from routing).
    """
    router = block.router
    batch, seq, dim = hidden.shape
    x = hidden.reshape(-1, dim)
    n = x.shape[0]
    logits = _logits(router, x)
    probs = _probs(logits, hidden.dtype)
    num_experts = logits.shape[-1]
    top1 = [int(torch.argmax(probs[t])) for t in range(n)]
    top2 = []
    for t in range(n):
        masked = logits[t].clone()
        masked[top1[t]] = float("-inf")
        top2.append(int(torch.argmax(masked)))
    p1 = torch.stack([probs[t, top1[t]] for t in range(n)])
    p2 = torch.stack([probs[t, top2[t]] for t in range(n)])
    eps = torch.finfo(hidden.dtype).eps

    def normalize(a, b):
        d = torch.clamp(a + b, min=eps)
        return a / d, b / d

    if router.normalize_router_prob_before_dropping:
        p1, p2 = normalize(p1, p2)
    pad = [False] * n if padding is None or router.router_ignore_padding_tokens else padding.reshape(-1).tolist()
    keep1 = [not pad[t] for t in range(n)]
    keep2 = [not pad[t] for t in range(n)]
    if capacity is not None:
        if router.batch_prioritized_routing:
            top_prob = probs.max(dim=-1).values.tolist()
            order = sorted(range(n), key=lambda t: (-top_prob[t], t))
        else:
            order = list(range(n))
        firsts = [0] * num_experts
        for t in order:
            if keep1[t]:
                firsts[top1[t]] += 1
        queue1 = [0] * num_experts
        queue2 = list(firsts)  # second choices wait behind every first choice of the expert
        for t in order:
            if keep1[t]:
                keep1[t] = queue1[top1[t]] < capacity
                queue1[top1[t]] += 1
            if keep2[t]:
                keep2[t] = queue2[top2[t]] < capacity
                queue2[top2[t]] += 1
    k1 = torch.tensor(keep1, dtype=hidden.dtype, device=hidden.device)
    k2 = torch.tensor(keep2, dtype=hidden.dtype, device=hidden.device)
    g1, g2 = p1 * k1, p2 * k2
    if not router.normalize_router_prob_before_dropping:
        g1, g2 = normalize(g1, g2)
    out = torch.zeros_like(x)
    for t in range(n):
        total = None
        for e, g, kept in ((top1[t], g1[t], keep1[t]), (top2[t], g2[t], keep2[t])):
            if not kept:
                continue
            y = block.experts[f"expert_{e}"](x[t][None])[0] * g
            if token_dropout > 0:
                y = y * (1 - token_dropout)
            y = y.to(hidden.dtype)
            total = y if total is None else total + y
        if total is not None:
            out[t] = total
    return out.reshape(batch, seq, dim)


def moe_ffn_reference(x, expert_index, gates, keep, w1, b1, w2, b2, act, out_scale=1.0):
    """Layer-only reference: ``out[n] = sum_k keep * gate * out_scale * (W2 act(W1 x + b1) + b2)``."""
    n, k = expert_index.shape
    out = torch.zeros_like(x)
    for t in range(n):
        total = None
        for j in range(k):
            if not bool(keep[t, j]):
                continue
            e = int(expert_index[t, j])
            h = x[t].to(w1.dtype) @ w1[e].T
            if b1 is not None:
                h = h + b1[e]
            h = act(h).to(w2.dtype)
            y = h @ w2[e].T
            if b2 is not None:
                y = y + b2[e]
            y = y * gates[t, j].to(y.dtype)
            if out_scale != 1.0:
                y = y * out_scale
            y = y.to(x.dtype)
            total = y if total is None else total + y
        if total is not None:
            out[t] = total
    return out
