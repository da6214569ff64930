"""Fused dense parts (``optimize(..., fuse_dense=True)``): SDPA attention with the bias, one-pass RMS norm."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import hf_moe_opt  # noqa: E402
from hf_moe_opt.dense import attention as dense_attention  # noqa: E402
from hf_moe_opt.dense import fuse_dense, unfuse_dense  # noqa: E402
from hf_moe_opt.dense.rms_norm import rms_norm, rms_norm_supported, t5_rms_norm_reference  # noqa: E402
from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402

from .models import tiny_nllb, tiny_switch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = DEVICE.type == "cuda" or kernels_interpreted()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="no CUDA device and TRITON_INTERPRET is not 1")

# Relative tolerance of the norm per dtype: a float32 sum in another order (fp32), then one or two
# roundings to the 16-bit dtype (triton's interpreter truncates where the GPU rounds to nearest).
NORM_RTOL = {torch.float32: 2e-6, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}


def _eager_attention(module, q, k, v, mask, scaling, position_bias):
    """Transformers' eager attention arithmetic, written out: the reference."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None:
        scores = scores + mask
    return torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).contiguous()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (2, 3, 96), (0, 16), (3, 1)])
def test_rms_norm_matches_t5_arithmetic(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE, dtype)
    assert rms_norm_supported(x, w)
    ours, ref = rms_norm(x, w, 1e-6), t5_rms_norm_reference(x, w, 1e-6)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), rtol=NORM_RTOL[dtype], atol=1e-6)


@needs_kernels
def test_rms_norm_strided_rows_and_eps():
    """Rows of a wider tensor (row stride > width), and an epsilon that matters (tiny inputs)."""
    wide = torch.randn(6, 40).to(DEVICE) * 1e-3
    x, w = wide[:, :24], torch.rand(24).to(DEVICE) + 0.5
    assert x.stride(0) == 40
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(rms_norm(x, w, eps), t5_rms_norm_reference(x, w, eps), rtol=2e-6, atol=1e-9)
    assert not torch.allclose(rms_norm(x, w, 1e-2), t5_rms_norm_reference(x, w, 1e-6))


def test_rms_norm_declines_mixed_dtypes():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8)
    assert not rms_norm_supported(x, w)  # bf16 input, float32 weight: the eager module's promotion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["bias+mask", "bias", "mask", "none", "one query", "bool mask"])
def test_sdpa_attention_matches_eager(dtype, case):
    g = torch.Generator().manual_seed(len(case))
    b, h, q_len, k_len, d = 3, 4, 1 if case == "one query" else 9, 9, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype) for n in (q_len, k_len, k_len))
    bias = (torch.randn(1, h, q_len, k_len, generator=g) * 2).to(DEVICE, dtype)
    keep = torch.ones(b, 1, q_len, k_len, dtype=torch.bool)
    keep[0, ..., 6:] = False
    keep = keep.to(DEVICE)
    additive = torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, torch.finfo(dtype).min)
    position_bias = bias if case in ("bias+mask", "bias", "one query") else None
    mask = {"mask": additive, "bias+mask": additive, "one query": additive, "bool mask": keep}.get(case)
    module = torch.nn.Module().eval()
    out, weights = dense_attention.sdpa_attention_with_bias(module, q, k, v, mask, 1.0, 0.0, position_bias)
    assert weights is None and out.shape == (b, q_len, h, d)
    ref_mask = additive if case == "bool mask" else mask
    exact = _eager_attention(module, *(t.double() for t in (q, k, v)), None if ref_mask is None else ref_mask.double(),
                             1.0, None if position_bias is None else position_bias.double())  # fmt: skip
    eager = _eager_attention(module, q, k, v, ref_mask, 1.0, position_bias)
    err = (out.double() - exact).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-5
    else:  # one fused kernel with a float32 softmax: no less accurate than the 16-bit eager passes
        assert err <= (eager.double() - exact).abs().max().item() + 2.0**-8


def test_combined_bias_reused_while_inputs_live():
    bias, mask = torch.randn(1, 2, 3, 3), torch.zeros(2, 1, 1, 3)
    first = dense_attention.combined_bias(bias, mask, torch.float32)
    assert dense_attention.combined_bias(bias, mask, torch.float32) is first
    torch.testing.assert_close(first, bias + mask)
    permuted = torch.randn(3, 3, 2).permute(2, 0, 1).unsqueeze(0)  # T5's compute_bias layout: [1, H, Q, K]
    assert permuted.stride(-1) != 1
    for m in (mask, None):
        assert dense_attention.combined_bias(permuted, m, torch.float32).stride(-1) == 1  # SDPA's fused kernels
    one_key = torch.randn(1, 1, 2).permute(2, 0, 1).unsqueeze(0)  # [1, H, 1, 1]: contiguous() keeps stride H
    assert dense_attention.combined_bias(one_key, None, torch.float32).stride(-1) == 1
    other = torch.zeros(2, 1, 1, 3)
    assert dense_attention.combined_bias(bias, other, torch.float32) is not first
    del bias, first
    gc.collect()
    assert "sum" not in dense_attention._LAST_BIAS  # freed with the bias it was made from


def _logits(model, ids, mask, dec):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_optimize_fuse_dense_matches_and_restores(make):
    model = make().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 11), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: the encoder mask matters
    dec = torch.randint(3, 64, (3, 5), generator=g).to(DEVICE)
    hf_moe_opt.optimize(model, capacity="none")
    ref = _logits(model, ids, mask, dec)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    hf_moe_opt.restore(model)
    hf_moe_opt.optimize(model, capacity="none", fuse_dense=True)
    assert model.config._attn_implementation == dense_attention.ATTENTION_NAME
    fused = _logits(model, ids, mask, dec)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), tokens)
    hf_moe_opt.restore(model)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_fused_parts_actually_run(make, monkeypatch):
    """Every attention module of the encoder and the decoder goes through SDPA, every Switch norm
    through the kernel (a T5-style stack reads its own deep copy of the config)."""
    from hf_moe_opt.dense import rms_norm as dense_norm

    calls = {"sdpa": 0, "norm": 0}
    sdpa, norm = F.scaled_dot_product_attention, dense_norm.rms_norm

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_norm(*args, **kwargs):
        calls["norm"] += 1
        return norm(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(dense_norm, "rms_norm", counting_norm)
    model = make().to(DEVICE)
    attention = [m for m in model.modules() if type(m).__name__ in ("SwitchTransformersAttention", "NllbMoeAttention")]
    norms = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersLayerNorm"]
    hf_moe_opt.optimize(model, fuse_dense=True)
    ids = torch.randint(3, 64, (2, 7)).to(DEVICE)
    _logits(model, ids, torch.ones_like(ids), ids[:, :4])
    assert calls["sdpa"] == len(attention) > 0
    assert calls["norm"] == (len(norms) if KERNELS else 0)
    hf_moe_opt.restore(model)
    _logits(model, ids, torch.ones_like(ids), ids[:, :4])
    assert calls["sdpa"] == len(attention)  # restored: eager again


def test_fuse_dense_reports_what_it_fused():
    switch, nllb = tiny_switch(), tiny_nllb()
    assert fuse_dense(switch) == ["attention", "rms_norm"]
    assert fuse_dense(nllb) == ["attention"]  # nn.LayerNorm is fused in torch already
    unfuse_dense(switch)
    unfuse_dense(nllb)
    assert fuse_dense(torch.nn.Linear(2, 2)) == []


def test_fuse_dense_rejects_other_families():
    from .test_families import tiny_model

    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="attn_implementation"):
        hf_moe_opt.optimize(model, fuse_dense=True)
    assert not hf_moe_opt.is_optimized(model)


def test_training_with_dropout_runs_the_eager_attention():
    """Dropout needs the eager path (SDPA's dropout draws other numbers): the family's own function runs."""
    attn = tiny_switch().encoder.block[0].layer[0].SelfAttention.train()
    q = k = v = torch.randn(1, 4, 3, 8)
    torch.manual_seed(0)
    out, weights = dense_attention.sdpa_attention_with_bias(attn, q, k, v, None, 1.0, 0.5, None)
    assert weights is not None  # only the eager function returns attention weights
    torch.manual_seed(0)
    ref, _ = dense_attention._eager_of(attn)(attn, q, k, v, None, scaling=1.0, dropout=0.5, position_bias=None)
    assert torch.equal(out, ref)


def test_fuse_dense_under_step_graphs_generates_the_same_tokens():
    """Decode steps with the fused attention over a static cache, replayed by the eager stand-in of a
    CUDA graph (host reads refused): the tokens of plain generate with the same fused model."""
    from hf_moe_opt.step_graphs import EagerCapture, runner_of

    plain, model = tiny_switch(num_experts=8), tiny_switch(num_experts=8)
    hf_moe_opt.optimize(plain, fuse_dense=True)
    hf_moe_opt.optimize(model, fuse_dense=True, cuda_graphs="step")
    runner_of(model).capture = EagerCapture()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = {"input_ids": ids, "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert runner_of(model).counts["replays"] > 0


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_a_fused_model_pickles_and_loads_in_a_fresh_process(make, tmp_path):
    # torch.save / torch.load of an optimize(..., fuse_dense=True) model: the fused norms' forward is a
    # picklable object, and loading registers the fused attention in a process that never optimized.
    import subprocess
    import sys

    model = make()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    hf_moe_opt.optimize(model, capacity="none", fuse_dense=True)
    want = _logits(model, ids, None, ids[:, :3])
    torch.save({"model": model, "ids": ids}, tmp_path / "fused.pt")
    torch.save(want, tmp_path / "want.pt")
    code = (
        "import torch, sys\n"
        f"saved = torch.load({str(tmp_path / 'fused.pt')!r}, weights_only=False)\n"
        "model, ids = saved['model'], saved['ids']\n"
        "with torch.no_grad():\n"
        "    got = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)\n"  # other threads: other fp32 sum order
        "norms = [m for m in model.modules() if 'forward' in m.__dict__]\n"
        "assert (len(norms) > 0) == (model.config.model_type == 'switch_transformers'), norms\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@needs_kernels
@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_fused_models_give_the_unfused_gradients_and_attention_weights(make):
    """With autograd on, the fused norm hands over to the eager one (the kernel has no backward); with
    output_attentions=True the fused attention computes the weights eagerly (SDPA returns none)."""
    import copy
    import warnings

    base = make().to(DEVICE)
    unfused = hf_moe_opt.optimize(copy.deepcopy(base), capacity="none")
    fused = hf_moe_opt.optimize(copy.deepcopy(base), capacity="none", fuse_dense=True)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 7), generator=g).to(DEVICE)
    dec = torch.randint(3, 64, (2, 4), generator=g).to(DEVICE)
    grads = []
    for model in (unfused, fused):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no gradients for expert weights"
            model(inputs_embeds=embeds, decoder_input_ids=dec).logits.square().sum().backward()
        first_norm = next(p for n, p in model.named_parameters() if "layer_norm" in n)
        grads.append((embeds.grad, first_norm.grad))
    (want_x, want_w), (got_x, got_w) = grads
    assert got_x is not None and got_w is not None
    torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        want = unfused(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
        got = fused(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(getattr(got, name)) == len(getattr(want, name)) > 0, name
        for a, b in zip(getattr(got, name), getattr(want, name), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sdpa_attention_default_scaling_is_one_over_sqrt_head_dim():
    """Without ``scaling`` the function scales by ``head_dim ** -0.5`` (SDPA's and transformers' eager
    default): head dim 16 gives 0.25, the result of SDPA called without a scale."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 16, generator=g) for _ in range(3))
    module = torch.nn.Module().eval()
    out, weights = dense_attention.sdpa_attention_with_bias(module, q, k, v, None)
    dense_attention._LAST_BIAS.clear()
    assert weights is None
    want = _eager_attention(module, *(t.double() for t in (q, k, v)), None, 0.25, None)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), rtol=0, atol=1e-6)
