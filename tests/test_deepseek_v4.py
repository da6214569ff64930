"""DeepSeek-V4's MoE block beyond the family tests: hash routing by token id (the table decides, the
router's scores weigh), a table that repeats an expert, the SwiGLU limit, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_moe_opt

from .test_families import FP32, _blocks, _ids, tiny_model


def _model(**overrides):
    return tiny_model("deepseek_v4", **overrides)


def _opt(model):
    opt = copy.deepcopy(model)
    hf_moe_opt.optimize(opt, backend="torch")
    return opt


def test_hash_layer_routes_by_the_table():
    """Layer 0 routes each token to ``tid2eid[token id]`` whatever its hidden state, weighted by the
    renormalised scores of those experts; another table gives another output."""
    model = _model()
    opt = _opt(model)
    layer = dict(hf_moe_opt.optimized_layers(opt))["model.layers.0.mlp"]
    router = layer.gate
    ids = _ids(batch=2, seq=7)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, indices = router(x, ids)
    table = router.tid2eid
    assert torch.equal(indices, table[ids.reshape(-1)])
    assert indices.shape == (14, 2) and (indices[:, 0] != indices[:, 1]).all()
    scores = torch.nn.functional.softplus(logits).sqrt().gather(1, indices)
    want = scores / (scores.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
    torch.testing.assert_close(weights, want, atol=0, rtol=0)
    with torch.no_grad():
        before = opt(ids).logits
        table.copy_(table.roll(1, dims=0))  # other experts for every id
        after = opt(ids).logits
        model_table = _blocks(model, "deepseek_v4")[0].gate.tid2eid
        model_table.copy_(model_table.roll(1, dims=0))
        torch.testing.assert_close(after, model(ids).logits, **FP32)
    assert not torch.allclose(before, after, atol=1e-3)


def test_table_repeating_an_expert_matches_transformers():
    """A table row naming one expert twice (transformers initialises the table to zeros) runs that
    expert in both slots, and both slots count, as in transformers."""
    model = _model()
    block = _blocks(model, "deepseek_v4")[0]
    with torch.no_grad():
        block.gate.tid2eid[:, 1] = block.gate.tid2eid[:, 0]
    opt = _opt(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, model(ids).logits, **FP32)


def test_swiglu_limit_binds_in_the_test_model():
    """The tiny model's limit changes the experts' outputs, so the family tests check the limited GLU."""
    model = _model()
    block = _blocks(model, "deepseek_v4")[1]
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        limited = block(x)
        block.experts.limit = 1e9
        unlimited = block(x)
    assert not torch.allclose(limited, unlimited, atol=1e-3)
    opt = _opt(model)  # the layer reads the limit it is built with
    assert dict(hf_moe_opt.optimized_layers(opt))["model.layers.1.mlp"].activation.limit == 1e9


def test_hash_layers_need_token_ids():
    opt = _opt(_model())
    embeds = opt.get_input_embeddings()(_ids())
    with torch.no_grad(), pytest.raises(ValueError, match="choose experts by token id: call the model with input_ids"):
        opt(inputs_embeds=embeds)


def test_learned_layers_alone_run_from_embeddings():
    """Without hash layers the model runs from ``inputs_embeds`` as transformers' does."""
    model = _model(mlp_layer_types=["moe", "moe"])
    opt = _opt(model)
    embeds = model.get_input_embeddings()(_ids())
    with torch.no_grad():
        torch.testing.assert_close(opt(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits, **FP32)


def test_other_expert_activations_are_refused():
    model = _model(hidden_act="gelu")
    with pytest.raises(ValueError, match="only SiLU's limited SwiGLU"):
        hf_moe_opt.optimize(model, backend="torch")
