"""Routers: model-family routing semantics, producing expert choices, gates and keep masks."""

from .nllb import nllb_route
from .padding import token_padding_mask
from .switch import switch_route
from .topk import deepseek_topk, softmax_topk, topk_routing, topk_softmax
from .types import Routing, router_logits

__all__ = [
    "Routing",
    "deepseek_topk",
    "nllb_route",
    "router_logits",
    "softmax_topk",
    "switch_route",
    "token_padding_mask",
    "topk_routing",
    "topk_softmax",
]
