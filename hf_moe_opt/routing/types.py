"""What every router returns, and the float32 router projection the families share."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Routing(NamedTuple):
    """Routing decisions for ``N`` tokens choosing ``k`` experts each.

    ``expert_index`` ``[N, k]`` int64, ``gates`` ``[N, k]`` combine weights (in the dtype the family
    multiplies expert outputs with), ``keep`` ``[N, k]`` bool (False: dropped by capacity, padding or
    a random second-expert policy; a dropped assignment contributes nothing). ``keep`` is None when the
    router dropped nothing, which lets dispatch skip the masking work.
    """

    expert_index: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor | None

    def keep_mask(self) -> torch.Tensor:
        """``keep`` as a tensor (all True when None)."""
        if self.keep is None:
            return torch.ones_like(self.expert_index, dtype=torch.bool)
        return self.keep


def router_logits(hidden_states: torch.Tensor, classifier: nn.Linear, router_dtype: torch.dtype) -> torch.Tensor:
    """``classifier(hidden_states)`` computed in ``router_dtype`` (float32: "selective precision").

    Unlike HF's routers this does not cast the classifier module in place, so the model's parameters
    keep their dtype. The cast copy is kept beside the module and made again when the weight changes
    (new storage or an in-place update), so a decode step does not pay a cast kernel per layer.
    """
    weight, bias = classifier.weight, classifier.bias
    if weight.dtype == router_dtype and (bias is None or bias.dtype == router_dtype):
        return nn.functional.linear(hidden_states.to(router_dtype), weight, bias)
    key = (weight.data_ptr(), weight._version, weight.device, router_dtype)
    if bias is not None:
        key += (bias.data_ptr(), bias._version)
    cached = classifier.__dict__.get("_hf_moe_opt_router_cast")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cast = (weight.to(router_dtype), None if bias is None else bias.to(router_dtype))
        cached = classifier.__dict__["_hf_moe_opt_router_cast"] = (key, cast)
    weight, bias = cached[1]
    return nn.functional.linear(hidden_states.to(router_dtype), weight, bias)
