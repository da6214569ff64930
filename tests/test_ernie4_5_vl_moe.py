"""ERNIE 4.5 VL MoE: a text and a vision sparse block per MoE layer, the tokens of each modality sent
to its own block by transformers' outer block. Against transformers, with text-only input, mixed
modalities, every token vision, router logits, bf16, the Triton kernels and `generate`."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_moe_opt

from .test_families import _ids, _keep_float32, _spread, _triton_runs_here

_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=[24, 16],  # text and vision experts of different widths
    moe_k=2,
    moe_num_experts=8,
    moe_num_shared_experts=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
)


def _need_model():
    if getattr(transformers, "Ernie4_5_VLMoeTextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no ERNIE 4.5 VL MoE")


def _text_model(dtype=torch.float32):
    _need_model()
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextModel

    torch.manual_seed(0)
    model = Ernie4_5_VLMoeTextModel(transformers.Ernie4_5_VLMoeTextConfig(**_TEXT)).eval()
    _spread(model)  # decisive routers, a nonzero correction bias
    model = model.to(dtype)
    _keep_float32(model)
    return model


def _token_types(kind: str, shape=(3, 9)) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_vision":
        return torch.ones(shape, dtype=torch.int32)
    return (torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.4).to(torch.int32)


def _vl_model():
    _need_model()
    vision = dict(
        depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=2, spatial_merge_size=1,
        temporal_merge_size=1,
    )  # fmt: skip
    special = dict(image_token_id=60, image_start_token_id=61, image_end_token_id=62)
    special.update(video_token_id=59, video_start_token_id=58, video_end_token_id=57)
    config = transformers.Ernie4_5_VLMoeConfig(text_config=_TEXT, vision_config=vision, **special)
    torch.manual_seed(0)
    model = transformers.Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    _spread(model)
    return model


@pytest.mark.parametrize("kind", ["none", "mixed", "all_vision"])
def test_text_model_matches_transformers(kind):
    ref = _text_model()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    names = [name for name, _ in hf_moe_opt.optimized_layers(opt)]
    assert names == ["layers.1.mlp.text_moe", "layers.1.mlp.vision_moe"]
    ids, types = _ids(), _token_types(kind)
    kwargs = {} if types is None else {"moe_mm_token_type_ids": types}
    with torch.no_grad():
        want = ref(ids, output_router_logits=True, **kwargs)
        got = opt(ids, output_router_logits=True, **kwargs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=2e-5, rtol=2e-5)
    assert len(got.router_logits) == len(want.router_logits) == 1
    torch.testing.assert_close(got.router_logits[0], want.router_logits[0], atol=2e-5, rtol=2e-5)
    assert list(opt.state_dict()) == list(state)
    hf_moe_opt.restore(opt)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids, **kwargs).last_hidden_state, want.last_hidden_state, atol=0, rtol=0)


def test_modalities_reach_their_own_experts():
    """Vision tokens run the vision experts: marking tokens as vision changes the output, as in transformers."""
    ref = _text_model()
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    ids = _ids()
    with torch.no_grad():
        text = opt(ids).last_hidden_state
        mixed = opt(ids, moe_mm_token_type_ids=_token_types("mixed")).last_hidden_state
    assert not torch.allclose(text, mixed, atol=1e-3)


def test_bf16_matches_transformers():
    ref = _text_model(torch.bfloat16)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    ids, types = _ids(), _token_types("mixed")
    with torch.no_grad():
        want = ref(ids, moe_mm_token_type_ids=types).last_hidden_state.float()
        got = opt(ids, moe_mm_token_type_ids=types).last_hidden_state.float()
    torch.testing.assert_close(got, want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


def test_triton_backend_matches_transformers():
    if not _triton_runs_here():
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _text_model().to(device)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="triton")
    ids, types = _ids().to(device), _token_types("mixed").to(device)
    with torch.no_grad():
        want = ref(ids, moe_mm_token_type_ids=types).last_hidden_state
        got = opt(ids, moe_mm_token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_vision_language_model_generates_the_reference_tokens():
    ref = _vl_model()
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    assert len(hf_moe_opt.optimized_layers(opt)) == 2
    prompt = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        got = opt.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_step_graphs_generate_the_reference_tokens():
    """Decode steps drop the modality ids (text only), so whole steps replay: with the CPU stand-in
    capture (which fails on any host read) the tokens equal plain generation's."""
    from hf_moe_opt.step_graphs import EagerCapture, runner_of

    model = _vl_model()
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain, backend="torch")
    hf_moe_opt.optimize(model, backend="torch", cuda_graphs="step")
    runner_of(model).capture = EagerCapture()
    prompt = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = plain.generate(prompt, **kw)
        got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    assert runner_of(model).counts["replays"] == 4 and runner_of(model).counts["fallbacks"] == 0


def test_step_graphs_on_cuda_generate_the_reference_tokens():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hf_moe_opt.step_graphs import runner_of

    model = _vl_model().cuda()
    plain = copy.deepcopy(model)
    hf_moe_opt.optimize(plain)
    hf_moe_opt.optimize(model, cuda_graphs="step")
    prompt = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(5)).cuda()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = plain.generate(prompt, **kw)
        got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    counts = runner_of(model).counts
    assert counts["captures"] == 1 and counts["replays"] == 4 and counts["fallbacks"] == 0


def test_check_support_counts_both_expert_widths():
    """`hf-moe-opt check`: both sparse blocks of the MoE layer, each modality's expert size, and their total."""
    _need_model()
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32)
    report = hf_moe_opt.check_support(transformers.Ernie4_5_VLMoeConfig(text_config=_TEXT, vision_config=vision))
    assert report.supported and len(report.layers) == 2
    # bf16 SiLU-GLU experts: 3 matrices of hidden x width, 2 bytes each.
    text, vision_bytes = (3 * 32 * width * 2 for width in _TEXT["moe_intermediate_size"])
    assert sorted(layer.expert_bytes for layer in report.layers) == sorted([text, vision_bytes])
    assert report.expert_bytes == 8 * (text + vision_bytes)
    assert "8 experts of 3.00 KiB/4.50 KiB each" in report.summary()
