"""Routers: model-family routing semantics, producing expert choices, gates and keep masks."""

from .nllb import nllb_route
from .padding import token_padding_mask
from .switch import switch_route
from .types import Routing, router_logits

__all__ = ["Routing", "nllb_route", "router_logits", "switch_route", "token_padding_mask"]
