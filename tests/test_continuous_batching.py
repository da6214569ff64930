"""Optimized layers under transformers' continuous batching (``model.generate_batch``).

Continuous batching packs prefill chunks and decode steps of several requests into one flat batch
``[1, T, D]`` with paged attention and runs the model in a background thread. Greedy tokens of the
optimized model must equal the un-optimized model's under continuous batching, and per-request
``generate``. ``generate_batch`` logs a failing forward instead of raising, so every request's
error and length are checked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.experts.store import ExpertStore, ResidentStore
from hf_moe_opt.integrations import (
    continuous_batching_available,
    continuous_batching_config,
    register_experts_implementation,
    uncapturable_layers,
)

from .test_families import tiny_model

if not continuous_batching_available():  # pragma: no cover - depends on the installed transformers
    pytest.skip("the installed transformers has no continuous batching (generate_batch)", allow_module_level=True)

from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

# Different lengths; 7 + 3 + 17 + 1 + 12 tokens exceed max_batch_tokens, so prefill is chunked and
# chunks share steps with other requests' decode tokens.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 47)), [10], list(range(12, 24))]
NEW_TOKENS = 6
SMALL_CACHE = dict(page_size=16, num_blocks=32, max_batch_tokens=24)  # CPU: auto-sizing is slow
# DeepSeek-V2/V3 are left out: transformers' paged cache cannot hold their MLA keys/values (the
# un-optimized models fail the same way in 5.17 and 5.24).
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe"]


def _greedy() -> GenerationConfig:
    # eos -1: every request generates NEW_TOKENS tokens.
    return GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)


def generate_batch(model: nn.Module, prompts=PROMPTS, **options) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens per prompt and their log-probabilities ``[requests, NEW_TOKENS]`` from
    ``model.generate_batch``; fails on any request error."""
    config = continuous_batching_config(model, **{**SMALL_CACHE, "return_logprobs": True, **options})
    results = model.generate_batch(
        prompts, generation_config=_greedy(), continuous_batching_config=config, warmup=False
    )
    outputs = list(results.values())  # in input order
    assert len(outputs) == len(prompts), f"{len(outputs)} of {len(prompts)} requests returned"
    errors = [r.error for r in outputs if r.error is not None]
    assert not errors, f"continuous batching failed: {errors[0]}"
    tokens = [list(r.generated_tokens) for r in outputs]
    assert all(len(t) == NEW_TOKENS for t in tokens), tokens
    return tokens, torch.tensor([r.logprobs for r in outputs])


def assert_same(got: tuple[list[list[int]], torch.Tensor], expected: tuple[list[list[int]], torch.Tensor]) -> None:
    """Same greedy tokens, and log-probabilities within fp32 reordering error."""
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-4)


def generate_each(model: nn.Module, prompts=PROMPTS) -> list[list[int]]:
    """Greedy tokens per prompt from plain ``generate``, one request at a time."""
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eos -1
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), generation_config=_greedy())
            out.append(ids[0, len(prompt) :].tolist())
    return out


def _record_inputs(model: nn.Module) -> list[tuple[tuple[int, ...], str]]:
    """Input shapes of the first optimized layer, with the attention implementation in force."""
    seen = []
    _, layer = hf_moe_opt.optimized_layers(model)[0]
    layer.register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), model.config._attn_implementation))
    )
    return seen


def _family_model(family: str) -> nn.Module:
    model = tiny_model(family)
    if family == "gpt_oss":
        model.set_attn_implementation("eager")  # no SDPA for GPT-OSS
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_matches_unoptimized(family):
    ref = _family_model(family)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    seen = _record_inputs(opt)
    expected = generate_batch(ref)
    assert_same(generate_batch(opt), expected)
    # Flat batches: one step held tokens of several requests (more than the longest prompt).
    assert all(shape[0] == 1 for shape, _ in seen)
    assert max(shape[1] for shape, _ in seen) > max(len(p) for p in PROMPTS)
    assert expected[0] == generate_each(ref), "transformers' continuous batching differs from generate"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shipped_qwen3_generate_batch_equals_generate(attn):
    path = shipped_model_path("qwen3-moe-tiny-ddtp")
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt)
    seen = _record_inputs(opt)
    got = generate_batch(opt)
    assert got[0] == generate_each(ref)
    assert_same(got, generate_batch(ref))
    # Continuous batching ran paged attention (5.17: "paged|sdpa"/"paged|eager"; 5.24: "sdpa"/"paged|eager")
    # and switched back afterwards.
    impls = {impl for _, impl in seen}
    assert len(impls) == 1 and attn in impls.pop() and opt.config._attn_implementation == attn


def test_experts_implementation_generate_batch():
    register_experts_implementation()
    from transformers.integrations import moe

    path = shipped_model_path("qwen3-moe-tiny-ddtp")
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, experts_implementation="hf_moe_opt").eval()
    rows = []
    original = moe.ExpertsInterface._global_mapping["hf_moe_opt"]

    def counting(module, hidden_states, *args):
        rows.append(hidden_states.shape[0])
        return original(module, hidden_states, *args)

    moe.ExpertsInterface._global_mapping["hf_moe_opt"] = counting
    try:
        got = generate_batch(ours)
    finally:
        moe.ExpertsInterface._global_mapping["hf_moe_opt"] = original
    assert rows and max(rows) > max(len(p) for p in PROMPTS)  # ran on packed batches
    assert_same(got, generate_batch(ref))


def test_expert_cache_generate_batch():
    ref = tiny_model("qwen3_moe")
    opt = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pinned memory on CPU
        hf_moe_opt.optimize(opt, backend="torch", expert_cache=0.5)
    assert uncapturable_layers(opt) and continuous_batching_config(opt).use_cuda_graph is False
    assert_same(generate_batch(opt), generate_batch(ref))
    assert all(s["misses"] > 0 for s in hf_moe_opt.stats(opt).values())


class _HostReadingStore(ExpertStore):
    """Resident experts, declared uncapturable like a store that reads the routing on the host."""

    def __init__(self, weights):
        super().__init__(weights)
        self._resident = ResidentStore(weights)

    def run(self, x, plan, ffn_for, activation, out_scale):
        return self._resident.run(x, plan, ffn_for, activation, out_scale)


def _with_uncapturable_store() -> nn.Module:
    model = tiny_model("qwen3_moe")
    hf_moe_opt.optimize(model, backend="torch")
    for _, layer in hf_moe_opt.optimized_layers(model):
        layer.store = _HostReadingStore(layer.weights)
    return model


def test_config_turns_graphs_off_for_uncapturable_layers():
    resident = tiny_model("qwen3_moe")
    hf_moe_opt.optimize(resident)
    assert uncapturable_layers(resident) == []
    assert continuous_batching_config(resident).use_cuda_graph is None  # transformers decides
    assert continuous_batching_config(resident, use_cuda_graph=True).use_cuda_graph is True
    model = _with_uncapturable_store()
    assert uncapturable_layers(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert continuous_batching_config(model).use_cuda_graph is False
    with pytest.raises(ValueError, match="cannot be captured"):
        continuous_batching_config(model, use_cuda_graph=True)
    with pytest.raises(ValueError, match="cannot be captured"):
        continuous_batching_config(model, use_cuda_graph=(False, True))


def test_read_behind_caches_keep_continuous_batching_out_of_graphs():
    """A read-behind expert cache runs its policy after each replay of a step graph of ours; in a
    continuous-batching graph nothing would, and its captured calls are one-token only."""
    import warnings

    model = tiny_model("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pinned memory without CUDA
        hf_moe_opt.optimize(model, expert_cache=2, cache_misses="read")
    assert uncapturable_layers(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert continuous_batching_config(model).use_cuda_graph is False
    with pytest.raises(ValueError, match='cache_misses="read"'):
        continuous_batching_config(model, use_cuda_graph=True)


def test_uncapturable_store_refuses_capture(monkeypatch):
    model = _with_uncapturable_store()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = model(ids).logits
        monkeypatch.setattr("hf_moe_opt.layer._stream_capturing", lambda x: True)
        with pytest.raises(RuntimeError, match="cannot run inside a CUDA-graph capture"):
            model(ids)
        for _, layer in hf_moe_opt.optimized_layers(model):
            layer.store = layer.store._resident  # resident experts capture fine
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_config_options_on_every_version():
    from transformers import ContinuousBatchingConfig

    fields = ContinuousBatchingConfig.__dataclass_fields__
    name = "page_size" if "page_size" in fields else "block_size"
    for alias in ("page_size", "block_size"):
        assert getattr(continuous_batching_config(**{alias: 32}), name) == 32
    with pytest.raises(TypeError, match="no option"):
        continuous_batching_config(page_sise=32)
    with pytest.raises(TypeError, match="one of"):
        continuous_batching_config(page_size=32, block_size=32)


def test_comparison_sees_the_layers():
    # The harness can fail: layers whose experts contribute nothing change the tokens.
    ref = tiny_model("qwen3_moe")
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    for _, layer in hf_moe_opt.optimized_layers(opt):
        layer.out_scale = 0.0
    assert generate_batch(opt)[0] != generate_batch(ref)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_generate_batch_cuda_graphs(family):
    # On CUDA, continuous batching captures each step in a CUDA graph: the optimized layers
    # (resident experts, Triton or torch backend) must capture and replay to the reference tokens.
    # The reference runs without graphs: transformers 5.17's own grouped_mm experts copy a host
    # tensor inside the step and cannot be captured.
    ref = _family_model(family).cuda()
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt)
    want = generate_batch(ref, use_cuda_graph=False)
    assert_same(generate_batch(opt, use_cuda_graph=True), want)
    assert_same(generate_batch(opt, use_cuda_graph=False), want)
