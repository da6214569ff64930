"""Experts whose SwiGLU limit applies after the activation (Step-3.7; Bailing hybrid from transformers
5.25 on, whose experts are Step-3.7's code): the optimized block and text model against transformers',
and the other GLUs shown to differ where the limit binds."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_moe_opt
from hf_moe_opt.experts.activation import act_limited_glu_activation, glu_activation, limited_swiglu_activation
from hf_moe_opt.patches import find_patch

from .test_families import _COMMON, _ids, _spread, tiny_model

_STEP = dict(
    _COMMON,
    head_dim=8,
    intermediate_size=40,
    moe_intermediate_size=24,
    n_routed_experts=8,
    num_experts_per_tok=3,
    share_expert_dim=20,
    moe_router_scaling_factor=2.5,
    mlp_layer_types=["dense", "sparse"],
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=8,
    swiglu_limits=[0.0, 0.3],
    swiglu_limits_shared=[0.0, 0.5],
)


def _step_config(**overrides):
    config_cls = getattr(transformers, "Step3p7TextConfig", None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no Step3p7TextConfig")
    return config_cls(**{**_STEP, **overrides})


def _step_block(config, dtype):
    from transformers.models.step3p7.modeling_step3p7 import Step3p7SparseMoeBlock

    torch.manual_seed(0)
    block = Step3p7SparseMoeBlock(config, layer_idx=1).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.7 if name == "gate.weight" else 0.3))
        block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.1)
    return block.to(dtype)


@pytest.mark.parametrize("limit", [0.3, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step3p7_block_matches_transformers(limit, dtype):
    """Routing (sigmoid, bias-corrected choice, renormalised), the limit after the activation,
    the routed output scaled by ``moe_router_scaling_factor``, the shared expert added."""
    config = _step_config(swiglu_limits=[0.0, limit])
    block = _step_block(config, dtype)
    patch = find_patch(block)
    assert patch is not None and patch.model_type == "step3p7"
    layer = patch.build(copy.deepcopy(block), config, capacity="model", backend="torch")
    assert layer.out_scale == 2.5
    # A zero entry turns the limit off (transformers 5.17 keeps a zero entry as a limit of 0, none as inf).
    if block.experts.limit is None:
        assert layer.activation.glu == "concatenated"
    else:
        assert (layer.activation.glu, layer.activation.limit) == ("act_limited", block.experts.limit)
    x = (torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    with torch.no_grad():
        want, got = block(x), layer(x)
    # bf16: transformers sums the experts' rounded outputs in bf16, then scales; we accumulate in fp32.
    scale = want.float().abs().max().item()
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2 * scale, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    if limit and dtype == torch.float32:
        # Where the limit binds, neither the plain GLU nor the limit before the activation is it.
        for other in (glu_activation("silu", torch.nn.functional.silu), limited_swiglu_activation(limit)):
            layer.activation = other
            with torch.no_grad():
                assert not torch.allclose(layer(x), want, atol=1e-3)


def test_step3p7_text_model_matches_transformers_and_restores():
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    config = _step_config()
    torch.manual_seed(0)
    ref = Step3p7TextModel(config).eval()
    _spread(ref)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    assert [layer.family for _, layer in hf_moe_opt.optimized_layers(opt)] == ["step3p7"]
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        torch.testing.assert_close(opt(ids).last_hidden_state, want, atol=2e-5, rtol=2e-5)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(ids).last_hidden_state, want, atol=0, rtol=0)
    assert type(opt.layers[1].mlp.gate).__name__ == "Step3p7TopKRouter"


def test_bailing_hybrid_experts_take_the_activation_of_the_family_they_copy():
    """Bailing hybrid's experts are DeepSeek-V3's up to transformers 5.24 and Step-3.7's from 5.25 on:
    the layer's GLU follows whichever code the installed experts have."""
    model = tiny_model("bailing_hybrid")
    hf_moe_opt.optimize(model, backend="torch")
    (_, layer), *_ = hf_moe_opt.optimized_layers(model)
    experts = layer.experts
    if getattr(experts, "limit", None) is None:
        assert layer.activation.glu == "concatenated"  # DeepSeek-V3's experts
    else:
        assert (layer.activation.glu, layer.activation.limit) == ("act_limited", 0.3)


def test_act_limited_glu_clamps_after_the_activation():
    h = torch.tensor([[-1.0, 0.2, 3.0, 2.0, -2.0, 0.1]])  # gate [-1, 0.2, 3], up [2, -2, 0.1]
    act = act_limited_glu_activation("silu", torch.nn.functional.silu, 0.5)
    silu = torch.nn.functional.silu(torch.tensor([-1.0, 0.2, 3.0]))
    want = torch.minimum(silu, torch.tensor(0.5)) * torch.tensor([0.5, -0.5, 0.1])
    torch.testing.assert_close(act.apply(h), want[None])
    with pytest.raises(ValueError, match="needs limit"):
        type(act)("glu_silu", torch.nn.functional.silu, glu="act_limited")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step3p7_block_triton_backend_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hf_moe_opt.experts.backends import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available")
    config = _step_config()
    block = _step_block(config, dtype).cuda()
    layer = find_patch(block).build(copy.deepcopy(block), config, capacity="model", backend="triton")
    x = (torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(4)) * 2).to("cuda", dtype)
    with torch.no_grad():
        want, got = block(x), layer(x)
        assert layer._backend_name(x.device) == "triton"
    scale = want.float().abs().max().item()
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-2 * scale, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
