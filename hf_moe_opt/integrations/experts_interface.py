"""``hf_moe_opt`` as a transformers experts implementation.

transformers 5.x decorates the experts module of many MoE families with
``@use_experts_implementation``: its forward ``(hidden_states [N, D], top_k_index [N, k],
top_k_weights [N, k]) -> [N, D]`` dispatches on ``config._experts_implementation`` through the
``ExpertsInterface`` registry (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``, ...). After
:func:`register_experts_implementation`::

    hf_moe_opt.register_experts_implementation()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="hf_moe_opt")
    # or: config._experts_implementation = "hf_moe_opt"; model = Model(config)
    # or: model.set_experts_implementation("hf_moe_opt")

every such experts module runs our dynamic-gating dispatch (device-side sort and histogram, no
host sync) and expert backend (grouped GEMMs; the fused Triton kernels where they cover the
activation). The model's own router and block run unchanged, so this covers every family that
accepts experts implementations, including ones without a patch; :func:`hf_moe_opt.optimize`
replaces whole blocks instead and adds the router-side options.

Registration imports ``transformers.integrations.moe``, which takes seconds on a cold start, so it is
not done on ``import hf_moe_opt``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..dispatch import make_plan
from ..experts.activation import Activation, activation_name, glu_activation
from ..experts.backends import choose_backend, get_backend
from ..grad_mode import records_grad

EXPERTS_IMPLEMENTATION = "hf_moe_opt"


def _interface_module():
    try:
        from transformers.integrations import moe
    except ImportError as err:  # pragma: no cover - depends on the installed transformers
        moe = None
        cause = err
    else:
        cause = None
    if moe is None or not hasattr(moe, "ExpertsInterface"):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} has no experts-implementation interface "
            "(transformers.integrations.moe.ExpertsInterface); upgrade transformers, or use "
            "hf_moe_opt.optimize(model), which works without it"
        ) from cause
    return moe


def _activation(module: nn.Module) -> Activation:
    """The experts module's activation, gated or not, exactly as its own forward applies it."""
    if not getattr(module, "has_gate", True):
        return Activation(activation_name(module.act_fn, [getattr(module, "config", None)]), module.act_fn)
    moe = _interface_module()
    default_gate = getattr(moe, "_default_apply_gate", None)
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is None or apply_gate is default_gate:
        # transformers' default gate: ``act(gate) * up`` on the concatenated halves (chunk(2)).
        return glu_activation(activation_name(module.act_fn, [getattr(module, "config", None)]), module.act_fn)
    return Activation("custom_glu", module._apply_gate, glu="custom", gate_fn=module._apply_gate)


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(w1, b1, w2, b2)`` in ``[E, out, in]`` compute layout: views of the module's parameters."""
    has_bias = getattr(module, "has_bias", False)
    if getattr(module, "has_gate", True):
        w1, b1 = module.gate_up_proj, getattr(module, "gate_up_proj_bias", None) if has_bias else None
    else:
        w1, b1 = module.up_proj, getattr(module, "up_proj_bias", None) if has_bias else None
    w2, b2 = module.down_proj, getattr(module, "down_proj_bias", None) if has_bias else None
    if getattr(module, "is_transposed", False):
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    return w1, b1, w2, b2


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"hf_moe_opt"`` experts implementation (same contract as transformers' ``grouped_mm``).

    Assignments to an index ``>= num_experts`` (expert-parallel sentinels) are dropped.
    """
    if getattr(self, "has_post_expert_norm", False):
        # A per-expert norm between the down projection and the routing weight does not fit the
        # fused combine; such modules run transformers' grouped implementation.
        return _interface_module().grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.training and torch.is_grad_enabled():
        raise RuntimeError(
            'experts_implementation="hf_moe_opt" runs inference only: call model.eval() or use "grouped_mm" to train'
        )
    num_experts = self.num_experts
    keep = top_k_index < num_experts
    plan = make_plan(top_k_index, top_k_weights, keep, num_experts)
    w1, b1, w2, b2 = _weights(self)
    # The Triton kernels have no backward: with autograd recording, torch's ops.
    name = (
        "torch"
        if records_grad(hidden_states, top_k_weights, w1, b1, w2, b2)
        else choose_backend("auto", hidden_states.device, plan.num_rows)
    )
    ffn: Callable = get_backend(name)
    return ffn(hidden_states, plan, w1, b1, w2, b2, _activation(self), 1.0)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Register :func:`experts_forward` with transformers' ``ExpertsInterface`` under ``name``.

    Idempotent. Returns ``name`` (pass it as ``experts_implementation=``). Raises ``RuntimeError``
    on transformers versions without the interface.
    """
    _interface_module().ExpertsInterface.register(name, experts_forward)
    return name


def is_experts_implementation_registered(name: str = EXPERTS_IMPLEMENTATION) -> bool:
    """Whether ``name`` is registered with the installed transformers' ``ExpertsInterface``."""
    try:
        moe = _interface_module()
    except RuntimeError:
        return False
    return name in moe.ExpertsInterface._global_mapping
