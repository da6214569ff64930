"""MoE encoders beyond Switch and NLLB-MoE: OpenAI Privacy Filter (GPT-OSS's block in a token
classifier, float32 experts with a clamped SwiGLU on concatenated halves), against transformers."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_moe_opt

from .test_families import _spread

_PRIVACY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    head_dim=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    num_local_experts=8,
    num_experts_per_tok=3,
    sliding_window=4,
    swiglu_limit=0.8,  # binds on the tiny model's activations
    max_position_embeddings=64,
    pad_token_id=0,
    num_labels=5,
)


def _privacy_filter():
    config_cls = getattr(transformers, "OpenAIPrivacyFilterConfig", None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no OpenAI Privacy Filter")
    torch.manual_seed(0)
    model = transformers.OpenAIPrivacyFilterForTokenClassification(config_cls(**_PRIVACY)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            elif ".mlp.experts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 0.2))
    _spread(model)
    return model


def _ids():
    return torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_privacy_filter_matches_transformers(backend):
    if backend == "triton":
        from .test_families import _triton_runs_here

        if not _triton_runs_here():
            pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _privacy_filter().to(device)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend=backend)
    layers = hf_moe_opt.optimized_layers(opt)
    assert [layer.family for _, layer in layers] == ["openai_privacy_filter"] * 2
    act, experts = layers[0][1].activation, ref.model.layers[0].mlp.experts
    # The experts' own values (0.8 from the config; transformers 5.17 hard-codes 1.702 and 7.0 there).
    assert (act.glu, act.alpha, act.limit) == ("clamped_swiglu_halves", experts.alpha, experts.limit)
    ids = _ids().to(device)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(opt(input_ids=ids, attention_mask=mask).logits, want, atol=2e-4, rtol=2e-4)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(input_ids=ids, attention_mask=mask).logits, want, atol=0, rtol=0)
    for key, value in opt.state_dict().items():
        torch.testing.assert_close(value, state[key].to(value.device), atol=0, rtol=0)


def test_privacy_filter_bf16_and_router_scores():
    """bf16 logits close to transformers'; the block returns the router's scores (weights / k) as
    transformers' does, and its output is k times the weighted expert sum."""
    ref = _privacy_filter().to(torch.bfloat16)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids).logits.float()
        got = opt(input_ids=ids).logits.float()
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        hf_block = ref.model.layers[0].mlp
        (_, layer), *_ = hf_moe_opt.optimized_layers(opt)
        (want_out, want_scores), (out, scores) = hf_block(x), layer(x)
    torch.testing.assert_close(scores, want_scores)
    assert torch.allclose(scores.sum(-1), torch.full_like(scores.sum(-1), 1.0 / 3), atol=1e-6)
    torch.testing.assert_close(out.float(), want_out.float(), atol=3e-2 * want_out.abs().max().item(), rtol=3e-2)
