"""Dispatch: sort routed tokens by expert into variable-size groups (dynamic gating)."""

from .plan import DispatchPlan, make_plan

__all__ = ["DispatchPlan", "make_plan"]
