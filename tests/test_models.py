"""Whole models: optimized vs the reference semantics, logits, router logits and generate."""

import copy
import math

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.patches.switch_transformers import records_top_probability

from .models import VOCAB, tiny_nllb, tiny_switch, use_reference_blocks

FP32 = dict(atol=2e-5, rtol=2e-5)
BF16 = dict(atol=6e-2, rtol=6e-2)


def _inputs(batch=3, src=11, tgt=6, pad_rows=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    for row, n_pad in pad_rows:
        mask[row, src - n_pad :] = 0
        ids[row, src - n_pad :] = 0
    dec = torch.randint(3, VOCAB, (batch, tgt), generator=g)
    return ids, mask, dec


def _pair(model, capacity="model", padding=None):
    ref = copy.deepcopy(model)
    use_reference_blocks(ref, capacity, padding)
    hf_moe_opt.optimize(model, capacity=capacity, backend="torch")
    return ref, model


def _router_logits_usable(model) -> bool:
    # transformers 5.0-5.17 record Switch's top-1 probability under that name and then fail to unpack it
    # in their own forward, so output_router_logits=True cannot run there (with or without hf_moe_opt).
    return model.config.model_type != "switch_transformers" or not records_top_probability()


def _compare(ref, opt, ids, mask, dec, tol):
    if not _router_logits_usable(ref):
        with torch.no_grad():
            r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
            o = opt(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        torch.testing.assert_close(o.logits, r.logits, **tol)
        return r, o
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_router_logits=True)
        o = opt(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_router_logits=True)
    torch.testing.assert_close(o.logits, r.logits, **tol)
    for a, b in zip(r.encoder_router_logits, o.encoder_router_logits, strict=True):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(r.decoder_router_logits, o.decoder_router_logits, strict=True):
        torch.testing.assert_close(b, a, **tol)
    return r, o


@pytest.mark.parametrize("num_experts", [1, 4, 8])
@pytest.mark.parametrize("expert_capacity", [2, 64])
@pytest.mark.parametrize("sparse_step", [1, 2])
@pytest.mark.parametrize("capacity", ["model", "none"])
def test_switch_fp32_matches_reference(num_experts, expert_capacity, sparse_step, capacity):
    model = tiny_switch(num_experts=num_experts, expert_capacity=expert_capacity, sparse_step=sparse_step)
    ref, opt = _pair(model, capacity)
    ids, mask, dec = _inputs()
    _compare(ref, opt, ids, mask, dec, FP32)


def test_switch_capacity_actually_drops_tokens():
    # Guard against a vacuous comparison: with capacity 1 the two capacity modes must differ.
    model = tiny_switch(num_experts=2, expert_capacity=1)
    dropped, kept = copy.deepcopy(model), copy.deepcopy(model)
    hf_moe_opt.optimize(dropped, capacity="model")
    hf_moe_opt.optimize(kept, capacity="none")
    ids, mask, dec = _inputs()
    with torch.no_grad():
        a = dropped(input_ids=ids, decoder_input_ids=dec).logits
        b = kept(input_ids=ids, decoder_input_ids=dec).logits
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("num_experts", [1, 2, 8])
@pytest.mark.parametrize(
    "routing",
    [
        dict(),
        dict(expert_capacity=2, moe_eval_capacity_token_fraction=-1.0),
        dict(moe_eval_capacity_token_fraction=0.3),
        dict(moe_eval_capacity_token_fraction=0.3, batch_prioritized_routing=True),
        dict(moe_eval_capacity_token_fraction=0.3, normalize_router_prob_before_dropping=True),
        dict(moe_eval_capacity_token_fraction=0.0, expert_capacity=3),
        dict(moe_token_dropout=0.0, router_ignore_padding_tokens=True),
    ],
    ids=["default", "fixed-cap", "frac", "frac-bpr", "frac-norm-before", "train-style-cap", "ignore-pad"],
)
@pytest.mark.parametrize("capacity", ["model", "none"])
def test_nllb_fp32_matches_reference_with_padding(num_experts, routing, capacity):
    model = tiny_nllb(num_experts=num_experts, **routing)
    ids, mask, dec = _inputs(pad_rows=[(0, 4), (2, 1)])
    ref, opt = _pair(model, capacity, padding={"encoder": mask == 0})
    _compare(ref, opt, ids, mask, dec, FP32)


def test_nllb_padding_with_heavy_capacity_pressure():
    model = tiny_nllb(num_experts=4, moe_eval_capacity_token_fraction=0.2)
    ids, mask, dec = _inputs(pad_rows=[(0, 5), (1, 2)])
    ref, opt = _pair(model, "model", padding={"encoder": mask == 0})
    _compare(ref, opt, ids, mask, dec, FP32)


@pytest.mark.parametrize("family", ["switch", "nllb"])
def test_bf16_matches_reference(family):
    """bf16 end to end with capacity drops (and padding for NLLB): logits within two bf16 ulps of the
    largest logit of the plain reference (a wrong gate renormalisation or queue order moves them by
    several)."""
    if family == "switch":
        model = tiny_switch(expert_capacity=3)
    else:
        model = tiny_nllb(moe_eval_capacity_token_fraction=0.3)
    model = model.to(torch.bfloat16)
    ids, mask, dec = _inputs(pad_rows=[(1, 3)] if family == "nllb" else ())
    ref, opt = _pair(model, "model", padding={"encoder": mask == 0})
    dropped = []
    for _, layer in hf_moe_opt.optimized_layers(opt):
        layer.observers.append(lambda _, routing: dropped.append(routing.keep is not None and not routing.keep.all()))
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
        o = opt(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
    assert any(dropped)  # the capacity binds
    largest = r.abs().max().item()
    two_ulps = 2 * 2.0 ** (math.floor(math.log2(largest)) - 7)
    torch.testing.assert_close(o, r, atol=two_ulps, rtol=0)


@pytest.mark.parametrize("family", ["switch", "nllb"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_yields_reference_tokens(family, num_beams):
    model = tiny_switch(expert_capacity=2) if family == "switch" else tiny_nllb(moe_eval_capacity_token_fraction=0.4)
    ids, mask, _ = _inputs(batch=4, pad_rows=[(3, 4)])
    ref, opt = _pair(model, "model", padding={"encoder": mask == 0})
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=num_beams, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = opt.generate(ids, **kw)
    assert torch.equal(got, want)


def test_padding_read_from_a_static_cache_mask():
    from hf_moe_opt.routing import token_padding_mask

    # A 4-D mask as long as a static cache's capacity (the slots after the current tokens masked):
    # 2 sequences, 3 tokens at key positions 4..6 of a 10-slot cache; sequence 1 has its first
    # key (position 0) padded, which is not among the routed tokens.
    batch, seq, keys = 2, 3, 10
    allowed = torch.zeros(batch, 1, seq, keys, dtype=torch.bool)
    for q in range(seq):
        allowed[:, 0, q, : 4 + q + 1] = True
    allowed[1, 0, :, 0] = False
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for m in (allowed, additive):
        assert not token_padding_mask(m, batch, seq).any()
    # Without the static slots (a dynamic cache: keys end with the tokens) the answer is the same.
    assert not token_padding_mask(additive[..., :7], batch, seq).any()
    # A padded routed token in an uncached (square) mask is still found.
    square = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
    square[0, 0, :, 2] = False
    assert token_padding_mask(square, batch, seq).tolist() == [False, False, True, False, False, False]


@pytest.mark.parametrize("family", ["switch", "nllb"])
@pytest.mark.parametrize("cache", [None, 2])
def test_a_batch_of_no_sequences_gives_an_empty_output(family, cache):
    """transformers' blocks take a [0, S, D] batch; the optimized layer (resident or cached) too."""
    import warnings

    model = (tiny_switch if family == "switch" else tiny_nllb)(num_experts=4)
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMLP"))
    x = torch.randn(0, 3, block.router.classifier.in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
        hf_moe_opt.optimize(model, **({"expert_cache": cache} if cache else {}))
    layer = hf_moe_opt.optimized_layers(model)[0][1]
    with torch.no_grad():
        out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (0, 3, x.shape[-1])
