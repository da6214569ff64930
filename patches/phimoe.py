"""PhiMoE (Phi-3.5-MoE): ``PhimoeSparseMoeBlock`` (``router`` with SparseMixer routing, fused SiLU-GLU
experts ``[E, 2F, D]``).

Router (``PhimoeTopKRouter``, an ``nn.Linear``) at inference, all in the logits' (model) dtype; always
two experts, whatever ``num_experts_per_tok`` says:

1. first expert: the arg-max of the logits ``l``; its weight is its softmax probability over the
   experts whose logit trails the best ``m`` by at most ``2 * router_jitter_noise`` relative to
   ``max(|l_e|, m)`` (the others masked to -inf);
2. second expert: the arg-max with the first masked out; its weight likewise, over the remaining
   experts within that margin of the second-best logit ``m2`` (relative to ``max(|l_e|, m2)``).

With the released margin (0.01) a clear winner gets weight 1. Training-time sampling (Gumbel
draws, Heun's gradient estimate) is not reproduced: the optimized layer runs inference only.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import FusedMoEPatch, hf_class

MODULE = "transformers.models.phimoe.modeling_phimoe"
PhimoeTopKRouter = hf_class(MODULE, "PhimoeTopKRouter")


def _weight_within_margin(
    candidates: torch.Tensor, logits: torch.Tensor, best: torch.Tensor, chosen: torch.Tensor, margin: float
) -> torch.Tensor:
    """Softmax probability of ``chosen`` over the ``candidates`` whose logit is within ``margin`` of ``best``."""
    far = (best - logits) / logits.abs().clamp(min=best) > 2 * margin
    return torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen)


def sparsemixer_top2(logits: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's inference routing of ``logits`` ``[N, E]``: ``(weights [N, 2], experts [N, 2])``, the
    weights in the logits' dtype (see the module docstring)."""
    best, first = logits.max(dim=-1, keepdim=True)
    w_first = _weight_within_margin(logits, logits, best, first, margin)
    rest = logits.scatter(-1, first, float("-inf"))
    second_best, second = rest.max(dim=-1, keepdim=True)
    w_second = _weight_within_margin(rest, logits, second_best, second, margin)
    return torch.cat((w_first, w_second), dim=-1), torch.cat((first, second), dim=-1)


if PhimoeTopKRouter is not None:

    class OptimizedPhimoeRouter(PhimoeTopKRouter):
        """Same module and routing (inference); returns ``(logits, weights, experts)``."""

        def forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight, self.bias)
            weights, experts = sparsemixer_top2(logits, self.router_jitter_noise)
            return logits, weights, experts

else:  # pragma: no cover - transformers without the model
    OptimizedPhimoeRouter = None


class PhimoePatch(FusedMoEPatch):
    model_type = "phimoe"
    module_path = MODULE
    block_class_name = "PhimoeSparseMoeBlock"
    router_name = "router"
    router_class = OptimizedPhimoeRouter
