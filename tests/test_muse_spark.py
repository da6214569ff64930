"""Muse Spark's MoE block (latent experts, an RMSNorm on each expert's output before the weighting):
its text model against transformers', through the torch backend and the Triton kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_moe_opt

from .test_families import _COMMON, _ids, _keep_float32, _spread, _triton_runs_here

_TEXT = dict(
    _COMMON,
    head_dim=8,
    intermediate_size=40,
    moe_intermediate_size=24,
    moe_hidden_size=16,
    num_local_experts=8,
    num_experts_per_tok=3,
    routed_scaling_factor=2.5,
    sliding_window=8,
    mlp_layer_types=["dense", "sparse"],
)


def _model(dtype=torch.float32):
    if getattr(transformers, "MuseSparkTextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Muse Spark")
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextModel

    torch.manual_seed(0)
    model = MuseSparkTextModel(transformers.MuseSparkTextConfig(**_TEXT)).eval()
    _spread(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pre_expert_norm.weight", "post_expert_norm.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.to(dtype)
    _keep_float32(model)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_muse_spark_text_model_matches_transformers(backend):
    if backend == "triton" and not _triton_runs_here():
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _model().to(device)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend=backend)
    assert [layer.family for _, layer in hf_moe_opt.optimized_layers(opt)] == ["muse_spark"]
    ids = _ids().to(device)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        torch.testing.assert_close(opt(ids).last_hidden_state, want, atol=2e-4, rtol=2e-4)
        assert list(opt.state_dict()) == list(state)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(ids).last_hidden_state, want, atol=0, rtol=0)


def test_muse_spark_bf16_and_the_per_expert_norm_matters():
    ref = _model(torch.bfloat16)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).last_hidden_state.float()
        got = opt(ids).last_hidden_state.float()
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
        # Without the norm on each expert's output the block is another function.
        (_, layer), *_ = hf_moe_opt.optimized_layers(opt)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
        block_out = ref.layers[1].mlp(x).float()
        torch.testing.assert_close(layer(x).float(), block_out, atol=3e-2 * block_out.abs().max().item(), rtol=3e-2)
        layer.experts.post_expert_norm = torch.nn.Identity()
        assert not torch.allclose(layer(x).float(), block_out, atol=0.1 * block_out.abs().max().item())
