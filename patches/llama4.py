"""Llama 4: ``Llama4TextMoe`` (sigmoid router ``router`` over the top-k logits, transposed SiLU-GLU
experts fed router-scaled inputs, a shared MLP that always runs).

Router (``Llama4Router``, an ``nn.Linear``): ``logits = x W^T`` in the model dtype, top-k of the
logits, ``score = sigmoid(logit.float())`` cast back to the model dtype; it returns
``(scores [N, E], logits)``, the scores 0 outside the top-k.

Block: unlike every other family, the score multiplies the expert's *input*, not its output:
``out = shared(x) + sum_e expert_e(x * score_e)``. transformers runs every expert on every token
(``[E, N, D]`` batched GEMMs, zero inputs where a score is 0, which the bias-free experts map to 0).
The activation is not linear, so the scale cannot move after the experts: the optimized layer makes
``k`` scaled copies of each token (``x * score``, rounded to the model dtype as transformers
rounds it), routes copy ``j`` of a token to its ``j``-th expert with gate 1, and sums the ``k``
outputs. With top-1 (every released Llama 4) that is one scaled row per token and no sum. The block
returns ``(hidden [N, D], router_logits)``; experts are ``gate_up_proj [E, D, 2F]`` (``x @ W``, gate
then up) and ``down_proj [E, F, D]``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_moe_opt.routing import topk_routing
from hf_moe_opt.routing.fused import try_fused_router

from .fused import FusedMoEPatch, PreroutedLayer, hf_class

MODULE = "transformers.models.llama4.modeling_llama4"
Llama4Router = hf_class(MODULE, "Llama4Router")

if Llama4Router is not None:

    class OptimizedLlama4Router(Llama4Router):
        """Same module and routing. Called as transformers calls it, returns ``(scores [N, E],
        logits)``; with ``return_topk=True`` (the optimized layer) ``(weights [N, k], logits,
        indices [N, k])`` instead -- the logits stay at index 1, where transformers' recorder of
        router logits reads them."""

        def forward(self, hidden_states: torch.Tensor, return_topk: bool = False):
            fused = None
            if self.bias is None and hidden_states.dtype == self.weight.dtype:
                dtype = hidden_states.dtype
                fused = try_fused_router(
                    hidden_states,
                    self.weight,
                    None,
                    mode="topk_sigmoid",
                    top_k=self.top_k,
                    logits_dtype=dtype,
                    gates_dtype=dtype,
                )
            if fused is not None:
                logits, indices, weights = fused
                values = None
            else:
                logits = F.linear(hidden_states, self.weight, self.bias)
                values, indices = torch.topk(logits, self.top_k, dim=1)
                weights = torch.sigmoid(values.float()).to(logits.dtype)
            if return_topk:
                return weights, logits, indices
            if values is None:
                values = logits.gather(1, indices)
            scores = torch.full_like(logits, float("-inf")).scatter_(1, indices, values)
            return torch.sigmoid(scores.float()).to(scores.dtype), logits

else:  # pragma: no cover - transformers without the model
    OptimizedLlama4Router = None


class Llama4Layer(PreroutedLayer):
    """Routed experts on router-scaled token copies, plus the shared MLP; returns
    ``(hidden [N, D], router_logits)`` as ``Llama4TextMoe`` does."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, logits, indices = self.router(x, return_topk=True)
        k = indices.shape[1]
        if k == 1:
            copies, experts = x * weights, indices
        else:  # copy j of every token, j-major as transformers repeats the tokens
            copies = (x.unsqueeze(0) * weights.t().unsqueeze(-1)).reshape(-1, x.shape[-1])
            experts = indices.t().reshape(-1, 1)
        gates = torch.ones(experts.shape, dtype=x.dtype, device=x.device)  # each copy is already scaled
        routed = self.run_experts(copies, topk_routing(gates, experts))
        if k > 1:
            routed = routed.view(k, -1, x.shape[-1]).sum(dim=0)
        return self.shared_expert(x) + routed, logits


class Llama4Patch(FusedMoEPatch):
    model_type = "llama4"
    module_path = MODULE
    block_class_name = "Llama4TextMoe"
    router_name = "router"
    router_class = OptimizedLlama4Router
    transposed = True
    layer_class = Llama4Layer
