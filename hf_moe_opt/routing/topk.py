"""Top-k routing of the decoder MoE families transformers stores with fused experts.

Each function maps router logits ``[N, E]`` to ``(weights [N, k], indices [N, k])`` exactly as the
family's transformers router does (same operations, same dtypes, same ``torch.topk`` calls), and
:func:`topk_routing` turns those into a :class:`~hf_moe_opt.routing.types.Routing` (no capacity:
every assignment is kept). Nothing here synchronises with the host.

* :func:`softmax_topk` -- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax in float32, top-k,
  optionally renormalised over the k; Mixtral keeps the weights in float32, the others cast them
  back to the logits' dtype.
* :func:`topk_softmax` -- GPT-OSS: top-k of the (biased) logits, softmax over those k in the
  logits' dtype.
* :func:`deepseek_topk` -- DeepSeek-V2/V3: softmax or sigmoid scores, an optional
  ``e_score_correction_bias`` that steers the choice only, greedy or group-limited top-k, optional
  renormalisation and ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch

from .types import Routing

SCORING_FUNCTIONS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def topk_routing(weights: torch.Tensor, indices: torch.Tensor) -> Routing:
    """A :class:`Routing` keeping every one of the ``k`` assignments of every token (``keep`` None:
    nothing is dropped, so the dispatch needs no mask)."""
    return Routing(indices, weights, None)


def softmax_topk(
    logits: torch.Tensor, top_k: int, *, normalize: bool, weights_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) -> top-k -> optional renormalisation over the k.

    ``weights_dtype``: the dtype of the returned weights (``None``: float32, as Mixtral's router;
    Qwen-MoE and OLMoE pass the logits' dtype).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return weights, indices


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, then a softmax over those k in the logits' dtype (GPT-OSS)."""
    values, indices = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(values, dim=1, dtype=values.dtype), indices


def group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """``[N, E]`` bool, True for the experts of each token's ``topk_group`` best groups."""
    num_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, num_group, num_experts // num_group).reshape(-1, num_experts).bool()


def deepseek_topk(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    normalize: bool = False,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing over float32 logits ``[N, E]``.

    Args:
        scoring: ``"softmax"`` (V2) or ``"sigmoid"`` (V3) scores.
        method: ``"greedy"`` (top-k of all experts); ``"group_limited_greedy"`` (V2: groups ranked by
            their best score, the experts outside the ``topk_group`` best groups get score 0);
            ``"noaux_tc"`` (V3: groups ranked by the sum of their two best bias-corrected scores,
            experts outside the chosen groups excluded).
        correction_bias: ``e_score_correction_bias`` ``[E]``, added to the scores for the choice only
            (the weights are the uncorrected scores).
        normalize: renormalise the k weights to sum to 1 (``norm_topk_prob``; V3 adds 1e-20).
        scaling: ``routed_scaling_factor``, applied last.
    """
    if scoring not in SCORING_FUNCTIONS:
        raise ValueError(f"unknown scoring function {scoring!r}; choose one of {', '.join(SCORING_FUNCTIONS)}")
    if method not in TOPK_METHODS:
        raise ValueError(f"unknown top-k method {method!r}; choose one of {', '.join(TOPK_METHODS)}")
    num_experts = logits.shape[-1]
    scores = logits.softmax(dim=-1, dtype=torch.float32) if scoring == "softmax" else logits.sigmoid()
    if method == "noaux_tc":
        choice = scores if correction_bias is None else scores + correction_bias
        group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~group_mask(group_scores, topk_group, num_experts), float("-inf"))
        indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        choice = scores if correction_bias is None else scores + correction_bias
        if method == "group_limited_greedy":
            group_scores = choice.view(-1, n_group, num_experts // n_group).max(dim=-1).values
            choice = choice.masked_fill(~group_mask(group_scores, topk_group, num_experts), 0.0)
        if correction_bias is None:
            weights, indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)
        else:
            indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, indices)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling, indices
