"""Expert buffering for the fused-expert families (Mixtral, Qwen2-MoE, DeepSeek-V3, GPT-OSS, ...).

transformers 5.x keeps these experts as fused ``[E, ...]`` parameters (GPT-OSS transposed and
biased). The cache must serve their slices through its slots with outputs those of the resident
optimized layer (bitwise on CUDA, see ``_assert_same`` for the CPU) and transformers' own forward;
byte budgets count whole experts, and shared experts stay out of the cache.
On a CUDA machine the dense weights run on the GPU (``move_dense``) and the copies are real.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.api import _find_blocks
from hf_moe_opt.cache import CachedExpertStore, move_dense, offload_device_map, simulate, trace_from_counts

from .models import offloading_hooks
from .test_families import BF16, FAMILIES, FP32, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MAIN = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
SHARED = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts", "deepseek_v2": "shared_experts"}


def _ids(batch: int = 3, seq: int = 9, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, seq), generator=g).to(DEVICE)


BATCHES = [_ids(seed=s) for s in (2, 3, 4)]


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise on CUDA. On the CPU, torch's vectorised elementwise kernels round an element in a
    loop's scalar tail differently, and the cache moves an expert's rows to another position
    (GPT-OSS's sigmoid shows it): there, at most a few units in the last place."""
    if got.is_cuda:
        assert torch.equal(got, want)
        return
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * float(want.abs().max()))


def _cached(base, **kw):
    """A copy of ``base`` (on the CPU) with its dense weights on DEVICE and an expert cache."""
    model = move_dense(copy.deepcopy(base), DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
        return hf_moe_opt.optimize(model, backend="torch", **kw)


def _run(model, batches=BATCHES):
    with torch.no_grad():
        return [model(ids).logits for ids in batches]


def _record_counts(model) -> dict[str, list[list[int]]]:
    record: dict[str, list[list[int]]] = {}
    for name, layer in hf_moe_opt.optimized_layers(model):
        inner = layer.store.run

        def run(x, plan, *args, _inner=inner, _name=name):
            record.setdefault(_name, []).append(plan.counts.tolist())
            return _inner(x, plan, *args)

        layer.store.run = run
    return record


def _fused_expert_bytes(model) -> int:
    """Bytes of one routed expert, from the checkpoint's fused parameters (biases included)."""
    block = _find_blocks(model)[0][3]
    params = [p for n, p in block.experts.named_parameters() if n.startswith(("gate_up_proj", "down_proj"))]
    assert len(params) == (4 if hasattr(block.experts, "gate_up_proj_bias") else 2)
    return sum(p[0].numel() * p.element_size() for p in params)


def _setup(family: str, dtype: torch.dtype = torch.float32) -> dict:
    base = tiny_model(family).to(dtype)
    hf = copy.deepcopy(base).to(DEVICE)
    resident = hf_moe_opt.optimize(copy.deepcopy(base).to(DEVICE), backend="torch")
    counts = _record_counts(resident)
    return {"base": base, "hf": _run(hf), "resident": _run(resident), "counts": counts, "hf_model": hf}


@pytest.fixture(scope="module", params=MAIN)
def fam(request):
    return {"name": request.param, **_setup(request.param)}


@pytest.mark.parametrize(
    "policy,slots",
    [("lifo", 1), ("lru", 1), ("lifo", 2), ("fifo", 2), ("lfu", 3), ("lfru", 2), ("lru", 5)],
)
def test_fused_cache_exact_and_counts_match_simulator(fam, policy, slots):
    model = _cached(fam["base"], expert_cache=slots, cache_policy=policy)
    outs = _run(model)
    for got, resident, hf in zip(outs, fam["resident"], fam["hf"], strict=True):
        _assert_same(got, resident)
        torch.testing.assert_close(got, hf, **FP32)
    nbytes = _fused_expert_bytes(fam["base"])
    stats = hf_moe_opt.stats(model)
    assert len(stats) == (1 if fam["name"].startswith("deepseek") else 2)
    for name, st in stats.items():
        trace = trace_from_counts(fam["counts"][name])
        sim = simulate(trace, policy, slots)
        assert (st["hits"], st["misses"]) == (sim.hits, sim.misses), name
        assert st["misses"] > 0 and st["num_slots"] == slots and len(st["resident"]) <= slots
        layer = dict(hf_moe_opt.optimized_layers(model))[name]
        assert isinstance(layer.store, CachedExpertStore)
        assert layer.store.expert_nbytes == nbytes
        assert st["bytes_copied"] == st["misses"] * nbytes
        needs_chunks = any(sum(c > 0 for c in step) > slots for step in fam["counts"][name])
        assert (st["chunked_steps"] > 0) == needs_chunks
    if slots == 1:
        assert all(st["chunked_steps"] > 0 for st in stats.values())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_fused_cache_bf16(family):
    ref = _setup(family, torch.bfloat16)
    for slots, policy in ((1, "lifo"), (2, "lfu")):
        model = _cached(ref["base"], expert_cache=slots, cache_policy=policy)
        for got, resident, hf in zip(_run(model), ref["resident"], ref["hf"], strict=True):
            assert got.dtype == torch.bfloat16
            _assert_same(got, resident)
            torch.testing.assert_close(got.float(), hf.float(), **BF16)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MAIN])
def test_other_fused_families_cached(family):
    ref = _setup(family)
    model = _cached(ref["base"], expert_cache=1, cache_policy="lru")
    for got, resident in zip(_run(model), ref["resident"], strict=True):
        _assert_same(got, resident)


def test_fused_cache_state_dict_one_copy_shared_resident_and_restore(fam):
    base = fam["base"]
    model = move_dense(copy.deepcopy(base), DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shared = SHARED.get(fam["name"])
    shared_before = {n: (p.data_ptr(), p.device) for n, p in model.named_parameters() if shared and f".{shared}." in n}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hf_moe_opt.optimize(model, backend="torch", expert_cache=0.5)
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].cpu(), v.cpu()), k
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == nbytes  # the host tensors are the parameters: no second copy
    for _, layer in hf_moe_opt.optimized_layers(model):
        store = layer.store
        assert store.num_slots == (4 if fam["name"] == "deepseek_v3" else 3)  # half of 8 or 6
        experts = layer.experts
        in_store = {id(p) for s in layer.weights.stacks() for p in s.params}
        fused = [p for n, p in experts.named_parameters() if n.startswith(("gate_up_proj", "down_proj"))]
        assert {id(p) for p in fused} == in_store
        for s, host in zip(layer.weights.stacks(), store._host_tensors(), strict=True):
            assert s.param.data_ptr() == host.data_ptr() and host.device.type == "cpu"
        # Shared experts are dense modules of the layer: not in the store, not moved, on the compute device.
        if shared:
            params = list(getattr(layer, shared).parameters())
            assert params and not any(id(p) in in_store for p in params)
            assert all(p.device.type == DEVICE.type for p in params)
        assert store.expert_nbytes == _fused_expert_bytes(base)
    if shared:
        now = {n: (p.data_ptr(), p.device) for n, p in model.named_parameters() if f".{shared}." in n}
        assert now == shared_before
    _run(model, BATCHES[:1])
    hf_moe_opt.restore(model)
    assert not hf_moe_opt.is_optimized(model)
    model.to(DEVICE)  # experts that came from host memory stay there on restore
    with torch.no_grad():
        torch.testing.assert_close(model(BATCHES[0]).logits, fam["hf"][0], **FP32)


def test_fused_byte_budget_counts_whole_experts(fam):
    nbytes = _fused_expert_bytes(fam["base"])
    layers = 1 if fam["name"].startswith("deepseek") else 2
    model = _cached(fam["base"], expert_cache=str(nbytes * 5))
    slots = [st["num_slots"] for st in hf_moe_opt.stats(model).values()]
    assert slots == ([5] if layers == 1 else [3, 2])
    for got, resident in zip(_run(model), fam["resident"], strict=True):
        _assert_same(got, resident)


def test_fused_generate_identical_tokens(fam):
    model = _cached(fam["base"], expert_cache=1)
    prompt = _ids(batch=2, seq=5, seed=7)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = fam["hf_model"].generate(prompt, **kw)
        got = model.generate(prompt, **kw)
    assert torch.equal(got, want)


def test_fused_pinned_experts(fam):
    names = list(fam["counts"])
    model = _cached(fam["base"], expert_cache=3, cache_policy="lru", pinned_experts={names[0]: [4, 1]})
    for got, resident in zip(_run(model), fam["resident"], strict=True):
        _assert_same(got, resident)
    st = hf_moe_opt.stats(model)[names[0]]
    sim = simulate(trace_from_counts(fam["counts"][names[0]]), "lru", 3, pinned=[4, 1])
    assert (st["hits"], st["misses"]) == (sim.hits, sim.misses)
    used = {e for step in fam["counts"][names[0]] for e, c in enumerate(step) if c}
    assert {4, 1} & used <= set(st["resident"])


def _cache_takes_over(model, resident_outputs) -> None:
    """optimize with a cache over offloaded experts: no meta parameters or hooks left, outputs exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hf_moe_opt.optimize(model, backend="torch", expert_cache=2)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not offloading_hooks(model)  # from_pretrained leaves plain device hooks on the dense parts
    for got, resident in zip(_run(model), resident_outputs, strict=True):
        _assert_same(got, resident)


def test_fused_offload_device_map_and_offloaded_experts_are_taken_over(fam):
    """Recipe 1: accelerate offloads each fused ``experts`` module (one module, 3-D parameters)."""
    from accelerate import cpu_offload

    model = move_dense(copy.deepcopy(fam["base"]), DEVICE)
    dmap = offload_device_map(model, DEVICE)
    names = [k for k, v in dmap.items() if k and v == "cpu"]
    assert names and all(n.endswith(".experts") for n in names)
    assert not any("shared" in n for n in names)
    maps = []
    for name in names:
        module = model.get_submodule(name)
        cpu_offload(module, execution_device=DEVICE)
        maps.append(module._hf_hook.hooks[-1].weights_map)
    assert any(p.device.type == "meta" for p in model.parameters())
    _cache_takes_over(model, fam["resident"])
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    for wm in maps:  # accelerate's host-side map forgot the experts: one copy of each weight
        dataset = wm.dataset
        assert len(list(dataset.state_dict if hasattr(dataset, "state_dict") else dataset)) == 0


def test_fused_from_pretrained_with_the_offload_device_map(fam, tmp_path):
    """Recipe 1 through ``from_pretrained``: on a GPU accelerate offloads each ``experts`` module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fam["base"].save_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    dmap = offload_device_map(skeleton, 0 if DEVICE.type == "cuda" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=dmap, dtype=torch.float32).eval()
    if DEVICE.type == "cuda":
        assert any(p.device.type == "meta" for p in model.parameters())
    _cache_takes_over(model, fam["resident"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA variant below covers it")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_cache_triton_interpreted(family):
    """The Triton kernels (interpreted on the CPU) over the slot tensors, GPT-OSS's transposed ones included."""
    if "triton" not in hf_moe_opt.experts.available_backends():
        pytest.skip("triton backend not available")
    from hf_moe_opt.kernels.moe_ffn import kernel_supported

    base = tiny_model(family)
    ids = [_ids(batch=2, seq=5, seed=9)]
    resident = hf_moe_opt.optimize(copy.deepcopy(base), backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = hf_moe_opt.optimize(copy.deepcopy(base), backend="triton", expert_cache=2)
    layer = hf_moe_opt.optimized_layers(model)[0][1]
    w1, _, w2, _ = layer.store._slot_tensors()
    assert kernel_supported(torch.zeros(1, w1.shape[2]), w1, w2, layer.activation)  # no torch fallback
    for got, want, hf in zip(_run(model, ids), _run(resident, ids), _run(base, ids), strict=True):
        torch.testing.assert_close(got, want, **FP32)
        torch.testing.assert_close(got, hf, **FP32)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_cache_pinned_triton_on_gpu(family):
    """On CUDA: pinned host tensors, async copies, and the Triton backend over the slot tensors."""
    if "triton" not in hf_moe_opt.experts.available_backends():
        pytest.skip("triton backend not available")
    base = tiny_model(family).to(torch.bfloat16)
    resident = hf_moe_opt.optimize(copy.deepcopy(base).to("cuda"), backend="triton")
    model = hf_moe_opt.optimize(move_dense(copy.deepcopy(base), "cuda"), backend="triton", expert_cache=2)
    assert all(st["host_pinned"] for st in hf_moe_opt.stats(model).values())
    for got, want in zip(_run(model), _run(resident), strict=True):
        torch.testing.assert_close(got.float(), want.float(), **BF16)


def test_per_expert_norms_go_where_the_layer_computes():
    """The cache streams the expert weight stacks only: the experts module's other tensors (Ergo's
    per-expert output norms) are the ones moved to the compute device."""
    from hf_moe_opt.cache.setup import experts_rest

    model = hf_moe_opt.optimize(tiny_model("ergo"), backend="torch")
    layer = hf_moe_opt.optimized_layers(model)[0][1]
    rest = {f"{type(m).__name__}.{key}" for m, key, _ in experts_rest(layer)}
    assert rest == {f"{type(layer.experts.post_expert_norm).__name__}.weight"}
    streamed = {id(p) for stack in layer.weights.stacks() for p in stack.params}
    assert {id(t) for _, _, t in experts_rest(layer)}.isdisjoint(streamed)
    mixtral = hf_moe_opt.optimize(tiny_model("mixtral"), backend="torch")
    assert experts_rest(hf_moe_opt.optimized_layers(mixtral)[0][1]) == []
