"""Correct, differentiable NLLB-MoE sparse MLP forward for training the tiny NLLB-MoE checkpoint.

transformers 5.x's ``NllbMoeExperts.forward`` one-hots the already one-hot top-1 mask, so only
``expert_0`` and ``expert_1`` ever run. Training (and evaluating) the tiny checkpoint therefore swaps
``NllbMoeSparseMLP.forward`` for the forward below, inside the training process only. It follows the
reference semantics of DESIGN.md:

* top-1 = argmax of the router probabilities; top-2 = argmax of the logits with top-1 masked
  (``second_expert_policy`` "all" / "sampling" / "random");
* padding tokens are removed from routing;
* capacity over the flattened batch: in train mode ``config.expert_capacity`` or, when that is
  ``None``, ``2 * ceil(N / E)``; at eval with ``moe_eval_capacity_token_fraction > 0`` it is
  ``ceil(fraction * N)``; second choices queue after all first choices;
  ``batch_prioritized_routing`` orders the slots by max probability;
* gates renormalised after dropping (before, with ``normalize_router_prob_before_dropping``);
* ``moe_token_dropout``: dropout on expert outputs in training, ``x (1 - p)`` at eval.

The HF router module is still called, so ``output_router_logits`` (and with it the load-balancing
auxiliary loss of ``NllbMoeForConditionalGeneration``) keeps working; its own routing result is
discarded.

``install(model, dense_experts=True)`` runs every expert on every token and weights the outputs by
the combine weights (zero where a token is not routed to the expert). The result is the same as the
gathered forward (up to float summation order) but has no data-dependent shapes, so on a GPU it needs
no host synchronisation; for the tiny model's few-MB experts the extra FLOPs are negligible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.nllb_moe import modeling_nllb_moe

_ORIGINAL_FORWARD = modeling_nllb_moe.NllbMoeSparseMLP.forward


def padding_flags(padding_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """Per-token padding flags (flattened ``batch * seq``, True = padding) from the mask a layer gets.

    Sparse layers receive the attention mask the layer itself uses: a 4D additive float mask
    (0 = attend), a 4D boolean mask (True = attend), ``None`` (nothing masked) or a 2D 0/1 mask.
    The last query row of a 4D mask marks the padded keys; the last ``seq`` keys are the tokens.
    """
    if padding_mask is None:
        return None
    m = padding_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    if m.dim() != 2:
        return None
    m = m[:, -seq:]
    if m.shape[0] != batch:
        m = m.expand(batch, -1)
    if m.dtype == torch.bool:
        pad = ~m
    elif m.is_floating_point():
        pad = m < 0
    else:
        pad = m == 0
    return pad.reshape(-1)


def top2_route(
    router_logits: torch.Tensor,
    pad: torch.Tensor | None,
    *,
    training: bool,
    expert_capacity: int | None,
    second_expert_policy: str = "all",
    normalize_router_prob_before_dropping: bool = False,
    batch_prioritized_routing: bool = False,
    moe_eval_capacity_token_fraction: float = 1.0,
):
    """NLLB-MoE top-2 routing over ``N`` flattened tokens.

    Returns ``(top1, top2, mask1, mask2, gate1, gate2)``: expert indices ``[N]``, float dispatch
    masks ``[N, E]`` after padding removal and capacity, and gates ``[N]`` (differentiable through
    the router probabilities).
    """
    n, e = router_logits.shape
    probs = F.softmax(router_logits.float(), dim=-1)
    top1 = probs.argmax(dim=-1)
    mask1 = F.one_hot(top1, e).to(probs.dtype)

    logits2 = router_logits.detach().float()
    if second_expert_policy == "sampling":
        logits2 = logits2 + torch.distributions.gumbel.Gumbel(0.0, 1.0).sample(logits2.shape).to(logits2)
    top2 = logits2.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1)
    mask2 = F.one_hot(top2, e).to(probs.dtype)

    def normalise(m1, m2):
        g1 = (probs * m1).sum(dim=1)
        g2 = (probs * m2).sum(dim=1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(probs.dtype).eps)
        return g1 / denom, g2 / denom

    if normalize_router_prob_before_dropping:
        gate1, gate2 = normalise(mask1, mask2)

    if second_expert_policy == "random":
        p2 = (probs * mask2).sum(dim=1).detach()
        mask2 = mask2 * ((2 * p2) > torch.rand_like(p2)).to(mask2.dtype)[:, None]

    if pad is not None:
        keep = (~pad).to(probs.dtype)[:, None]
        mask1 = mask1 * keep
        mask2 = mask2 * keep

    if batch_prioritized_routing:
        order = torch.argsort(-probs.detach().max(dim=1).values, stable=True)
        inverse = torch.argsort(order)
        loc1 = (torch.cumsum(mask1[order], dim=0) - 1)[inverse]
        loc2 = (torch.cumsum(mask2[order], dim=0) - 1)[inverse]
    else:
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1
    loc2 = loc2 + mask1.sum(dim=0, keepdim=True)

    if not training and moe_eval_capacity_token_fraction > 0:
        capacity = math.ceil(moe_eval_capacity_token_fraction * n)
    elif expert_capacity is not None:
        capacity = expert_capacity
    else:
        capacity = 2 * math.ceil(n / e)
    mask1 = mask1 * (loc1 < capacity).to(mask1.dtype)
    mask2 = mask2 * (loc2 < capacity).to(mask2.dtype)

    if not normalize_router_prob_before_dropping:
        gate1, gate2 = normalise(mask1, mask2)
    else:
        gate1 = gate1 * mask1.sum(dim=1)
        gate2 = gate2 * mask2.sum(dim=1)
    return top1, top2, mask1, mask2, gate1, gate2


def sparse_mlp_forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """Drop-in ``NllbMoeSparseMLP.forward`` with the correct top-2 semantics (see module docstring)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden_dim)
    router = self.router
    _, _, router_logits = router(flat, padding_mask)
    pad = padding_flags(padding_mask, batch_size, sequence_length)
    top1, _, mask1, mask2, gate1, gate2 = top2_route(
        router_logits,
        pad,
        training=self.training,
        expert_capacity=getattr(self, "train_expert_capacity", router.expert_capacity),
        second_expert_policy=router.second_expert_policy,
        normalize_router_prob_before_dropping=router.normalize_router_prob_before_dropping,
        batch_prioritized_routing=router.batch_prioritized_routing,
        moe_eval_capacity_token_fraction=router.moe_eval_capacity_token_fraction,
    )

    usage = getattr(self, "usage", None)
    if usage is not None:
        with torch.no_grad():
            real = torch.ones_like(top1, dtype=torch.bool) if pad is None else ~pad
            dev = usage["top1"].device
            usage["top1"] += torch.bincount(top1[real], minlength=self.num_experts).double().to(dev)
            usage["routed"] += (mask1 + mask2).sum(dim=0).double().to(dev)
            usage["tokens"] += int(real.sum())

    experts = self.experts
    p_drop = experts.moe_token_dropout
    out = torch.zeros_like(flat)
    combined = gate1[:, None] * mask1 + gate2[:, None] * mask2
    if getattr(self, "dense_experts", False):
        for j in range(self.num_experts):
            y = experts[f"expert_{j}"](flat) * combined[:, j, None].to(flat.dtype)
            if p_drop > 0:
                y = experts.token_dropout(y) if self.training else y * (1 - p_drop)
            out = out + y.to(out.dtype)
        return out.reshape(batch_size, sequence_length, hidden_dim)
    hit = (mask1 + mask2) > 0
    for j in range(self.num_experts):
        idx = hit[:, j].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = experts[f"expert_{j}"](flat[idx]) * combined[idx, j, None].to(flat.dtype)
        if p_drop > 0:
            y = experts.token_dropout(y) if self.training else y * (1 - p_drop)
        out = out.index_add(0, idx, y.to(out.dtype))
    return out.reshape(batch_size, sequence_length, hidden_dim)


def install(model, dense_experts: bool = False) -> None:
    """Use the correct forward for every NLLB-MoE sparse MLP (class-level, this process only).

    ``dense_experts``: run each expert on all tokens, weighted by the combine weights (same result,
    no host synchronisation; meant for GPUs).
    """
    modeling_nllb_moe.NllbMoeSparseMLP.forward = sparse_mlp_forward
    for module in model.modules():
        if isinstance(module, modeling_nllb_moe.NllbMoeSparseMLP):
            module.train_expert_capacity = model.config.expert_capacity
            module.dense_experts = dense_experts


def uninstall() -> None:
    modeling_nllb_moe.NllbMoeSparseMLP.forward = _ORIGINAL_FORWARD
