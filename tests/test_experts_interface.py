"""``experts_implementation="hf_moe_opt"``: transformers' experts interface running our dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_moe_opt
from hf_moe_opt.integrations import (
    EXPERTS_IMPLEMENTATION,
    experts_forward,
    is_experts_implementation_registered,
    register_experts_implementation,
)

from .models import GEMMA4_MOE
from .test_families import FAMILIES, _ids, tiny_model

moe = pytest.importorskip("transformers.integrations.moe")
if not hasattr(moe, "ExpertsInterface"):  # pragma: no cover - older transformers
    pytest.skip("this transformers has no ExpertsInterface", allow_module_level=True)

FP32 = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert register_experts_implementation() == EXPERTS_IMPLEMENTATION
    assert is_experts_implementation_registered()


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_matches_default(family):
    default = tiny_model(family)  # transformers' default experts implementation
    ours = tiny_model(family, experts_implementation="hf_moe_opt")  # same seed: same weights
    assert ours.config._experts_implementation == "hf_moe_opt"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, default(ids).logits, **FP32)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_set_experts_implementation_and_generate(family):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    model.set_experts_implementation("hf_moe_opt")
    prompt = _ids(batch=2, seq=5, seed=3)
    with torch.no_grad():
        a = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_experts_forward_is_used_and_drops_sentinels():
    model = tiny_model("qwen3_moe", experts_implementation="hf_moe_opt")
    experts = model.model.layers[0].mlp.experts
    calls = []
    original = moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION]
    moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION] = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION] = original
    assert len(calls) == 2
    # An index >= num_experts (an expert-parallel sentinel) contributes nothing.
    x = torch.randn(4, 32)
    idx = torch.tensor([[0, 1], [2, experts.num_experts], [3, 4], [5, 0]])
    w = torch.rand(4, 2)
    with torch.no_grad():
        full = experts_forward(experts, x, idx.clamp(max=experts.num_experts - 1), w * (idx < experts.num_experts))
        dropped = experts_forward(experts, x, idx, w)
    torch.testing.assert_close(dropped, full, **FP32)


def test_bf16_close_to_default():
    default = tiny_model("deepseek_v3").to(torch.bfloat16)
    ours = copy.deepcopy(default)
    ours.set_experts_implementation("hf_moe_opt")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits.float(), default(ids).logits.float(), atol=1e-2, rtol=1e-2)


def test_training_mode_raises():
    model = tiny_model("olmoe", experts_implementation="hf_moe_opt").train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(_ids())


def test_exported_from_package():
    assert hf_moe_opt.register_experts_implementation is register_experts_implementation


def test_unsupported_block_error_points_to_the_experts_implementation():
    """A family without a patch whose experts take implementations: the error says how to use ours there."""
    from transformers import BertConfig, BertModel

    if getattr(transformers, "Gemma4TextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    # Gemma 4's MoE lives inside its decoder layer (router and experts beside the dense MLP): no block.
    config = transformers.Gemma4TextConfig(**GEMMA4_MOE)
    with pytest.raises(ValueError, match=r"no supported sparse MoE block; .*experts_implementation=\"hf_moe_opt\""):
        hf_moe_opt.optimize(transformers.Gemma4ForCausalLM(config))
    dense = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"no supported sparse MoE block\. Supported:"):
        hf_moe_opt.optimize(dense)
    # A supported family whose config builds no sparse layer (more sparse layers than layers gives a
    # sparse step of 0, as transformers' default of 12 does on a small model): the error says so.
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    switch = SwitchTransformersConfig(
        d_model=16, num_experts=4, num_layers=2, num_decoder_layers=2, d_ff=32, d_kv=8, num_heads=2, vocab_size=64,
        num_sparse_encoder_layers=3, num_sparse_decoder_layers=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"supported family, but this model has no SwitchTransformersSparseMLP"):
        hf_moe_opt.optimize(SwitchTransformersForConditionalGeneration(switch).eval())


def test_activation_name_comes_from_the_config_that_built_act_fn():
    """The kernels pick the activation by name: a config whose hidden_act did not build act_fn is ignored."""
    from hf_moe_opt.integrations.experts_interface import _activation

    experts = tiny_model("mixtral").model.layers[0].mlp.experts
    assert _activation(experts).name == "glu_silu"
    experts.config.hidden_act = "gelu"  # act_fn is still SiLU (an experts module with a hard-coded activation)
    assert "gelu" not in _activation(experts).name
    ids = _ids()
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.config.hidden_act = "gelu"
    ref = copy.deepcopy(model)
    model.set_experts_implementation("hf_moe_opt")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, **FP32)


def test_gradients_with_autograd_on_whatever_backend_auto_picks(monkeypatch):
    """Eval mode with autograd on: the input gradient is transformers' default's even where "auto"
    would pick the Triton kernels (which have no backward; forced here)."""
    from hf_moe_opt.integrations import experts_interface

    monkeypatch.setattr(experts_interface, "choose_backend", lambda *args: "triton")
    grads = []
    for implementation in (None, "hf_moe_opt"):
        model = tiny_model("mixtral", experts_implementation=implementation)
        embeds = model.get_input_embeddings()(_ids()).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().sum().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[1], grads[0], **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma4_moe_through_the_experts_implementation(dtype):
    """Gemma 4 has no sparse block to replace (its router and experts sit in the decoder layer beside
    the dense MLP): ``experts_implementation="hf_moe_opt"`` runs its experts through ours, every MoE
    layer calls it, and logits and greedy tokens equal transformers' default experts."""
    if getattr(transformers, "Gemma4TextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    torch.manual_seed(0)
    default = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**GEMMA4_MOE)).eval().to(dtype)
    with torch.no_grad():  # decisive routing and experts that move the logits
        g = torch.Generator().manual_seed(1)
        for name, p in default.named_parameters():
            if name.endswith(("router.proj.weight", "experts.gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.3)
    ours = copy.deepcopy(default)
    ours.set_experts_implementation("hf_moe_opt")
    ids = _ids()
    calls = []
    original = moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION]
    moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION] = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            got = ours(ids).logits.float()
    finally:
        moe.ExpertsInterface._global_mapping[EXPERTS_IMPLEMENTATION] = original
    assert len(calls) == GEMMA4_MOE["num_hidden_layers"]
    with torch.no_grad():
        want = default(ids).logits.float()
        tol = FP32 if dtype == torch.float32 else dict(atol=1e-2 * want.abs().max().item(), rtol=1e-2)
        torch.testing.assert_close(got, want, **tol)
        prompt = _ids(batch=2, seq=5, seed=3)
        if dtype == torch.float32:
            a = default.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), a)
