"""Tiny models built from configs, and a way to run them with the reference MoE semantics."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    NllbMoeConfig,
    NllbMoeForConditionalGeneration,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from .reference import nllb_capacity, nllb_reference, switch_reference

VOCAB = 64


def tiny_switch(num_experts=4, expert_capacity=3, sparse_step=1, d_model=32, d_ff=48, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_experts=num_experts,
        expert_capacity=expert_capacity,
        encoder_sparse_step=sparse_step,
        decoder_sparse_step=sparse_step,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **kw,
    )
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    _spread_router(model)
    return model


def tiny_nllb(num_experts=4, expert_capacity=64, sparse_step=1, d_model=32, ffn=48, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = NllbMoeConfig(
        vocab_size=VOCAB,
        d_model=d_model,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_experts=num_experts,
        expert_capacity=expert_capacity,
        encoder_sparse_step=sparse_step,
        decoder_sparse_step=sparse_step,
        decoder_start_token_id=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        max_position_embeddings=64,
        **kw,
    )
    model = NllbMoeForConditionalGeneration(cfg).eval()
    _spread_router(model)
    return model


@torch.no_grad()
def _spread_router(model: nn.Module) -> None:
    # Random init gives near-uniform routers; larger router weights make routing decisive and varied.
    for name, p in model.named_parameters():
        if "router.classifier" in name:
            p.normal_(0.0, 1.0)


class ReferenceBlock(nn.Module):
    """Stands in for a HF sparse MLP and computes the reference semantics with its modules."""

    def __init__(self, block: nn.Module, family: str, capacity: str, padding: dict, role: str):
        super().__init__()
        self.router = block.router
        self.experts = block.experts
        self.family, self.capacity, self.padding, self.role = family, capacity, padding, role

    def forward(self, hidden, padding_mask=None):
        if self.family == "switch":
            self.router(hidden)  # fires transformers' router-logit recorder
            cap = self.router.expert_capacity if self.capacity == "model" else None
            return switch_reference(self, hidden, cap)
        batch, seq, dim = hidden.shape
        self.router(hidden.reshape(-1, dim), None)
        pad = self.padding.get(self.role)
        cap = None
        if self.capacity == "model":
            cap = nllb_capacity(self.router, batch * seq, self.config_capacity)
        return nllb_reference(
            self, hidden, pad, capacity=cap, token_dropout=getattr(self.experts, "moe_token_dropout", 0.0)
        )


def use_reference_blocks(model: nn.Module, capacity: str = "model", padding: dict | None = None) -> dict:
    """Swap every sparse MLP of ``model`` for :class:`ReferenceBlock`; returns the padding dict.

    ``padding`` maps ``"encoder"``/``"decoder"`` to ``[B, S]`` bool masks (True = padding tokens).
    """
    padding = {} if padding is None else padding
    targets = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, (SwitchTransformersSparseMLP, NllbMoeSparseMLP)):
                targets.append((parent_name, parent, name, child))
    for parent_name, parent, name, child in targets:
        family = "switch" if isinstance(child, SwitchTransformersSparseMLP) else "nllb"
        role = "decoder" if "decoder" in parent_name else "encoder"
        ref = ReferenceBlock(child, family, capacity, padding, role)
        ref.config_capacity = model.config.expert_capacity
        ref.train(child.training)
        setattr(parent, name, ref)
    return padding


# ------------------------------------------------------------------------------- expert stores


def integer_expert_weights(num_experts: int, hidden: int, ffn: int, seed: int = 0):
    """Expert weights of small integers (fp32): every GEMM over integer rows is exact, so a store's
    output cannot depend on how rows are blocked into GEMMs (devices, ranks, replicas)."""
    from hf_moe_opt.experts.weights import ExpertStack, ExpertWeights

    g = torch.Generator().manual_seed(seed)

    def stack(name: str, *shape: int) -> ExpertStack:
        params = [nn.Parameter(torch.randint(-2, 3, shape, generator=g).float()) for _ in range(num_experts)]
        return ExpertStack(params, name)

    return ExpertWeights(
        w1=stack("w1", ffn, hidden), w2=stack("w2", hidden, ffn), b1=stack("b1", ffn), b2=stack("b2", hidden)
    )


def random_routing(seed: int, tokens: int, top_k: int, hidden: int, num_experts: int, drop: float):
    """Integer rows ``x`` and a dispatch plan with random fp32 gates, ``drop`` of the assignments dropped."""
    from hf_moe_opt.dispatch import make_plan

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (tokens, hidden), generator=g).float()
    expert_index = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :top_k]  # distinct experts
    gates = torch.rand(tokens, top_k, generator=g)
    keep = torch.rand(tokens, top_k, generator=g) >= drop if drop else None
    return x, make_plan(expert_index, gates, keep, num_experts)


def offloading_hooks(model) -> list[str]:
    """Modules whose accelerate hook still offloads weights (plain device-moving hooks do not count)."""
    found = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook] if hook is not None else []):
            if getattr(h, "offload", False) or getattr(h, "weights_map", None) is not None:
                found.append(name)
    return found


def copied(model: nn.Module, how: str) -> nn.Module:
    """A copy of ``model`` made as users make them: ``"deepcopy"``, or ``"pickle"`` (torch.save + load)."""
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# A tiny Gemma 4 text model with its MoE (in the decoder layer, no sparse block).
GEMMA4_MOE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=16,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=24,
    vocab_size_per_layer_input=64,
    hidden_size_per_layer_input=8,
    layer_types=["sliding_attention", "full_attention"],
)
