"""Placement over several devices (CPU stand-ins) and device maps for the fused-expert families.

A fused ``[E, ...]`` parameter cannot be split over devices: every device gets a copy of the slices
of the experts the plan puts there, and the parameter (the ``state_dict`` copy) lives in host
memory. Outputs must equal the single-device optimized layer and transformers' own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.api import _find_blocks
from hf_moe_opt.placement import PlacementPlan, plan_placement, profile
from hf_moe_opt.placement.store import PlacedExpertStore

from .test_families import BF16, FP32, tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
DEVICES = ["cpu", "cpu"]


def _ids(seed: int, batch: int = 3, seq: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, seq), generator=g)


def _plans(model, num_devices: int = 2) -> dict[str, PlacementPlan]:
    trace = profile(model, [{"input_ids": _ids(50 + i, 4)} for i in range(4)], progress=False)
    shares = [0.7, 0.3]
    hand = {
        name: [[((e + i) % num_devices, shares[i]) for i in range(num_devices)] for e in range(trace.num_experts)]
        for name in trace.layers
    }
    return {
        "round_robin": plan_placement(trace, num_devices, "round_robin"),
        "greedy": plan_placement(trace, num_devices, "greedy"),
        "replicate": plan_placement(trace, num_devices, "replicate", 1),
        "hand_replicas": PlacementPlan(num_devices=num_devices, strategy="hand", layers=hand),
    }


def _fused_params(layer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in layer.experts.named_parameters() if n.startswith(("gate_up_proj", "down_proj"))}


@pytest.fixture
def one_thread():
    """One intra-op thread: with more, a CPU GEMM may split its rows differently when a device holds
    fewer experts, and the bit-for-bit claim below is about our dispatch, not the BLAS's threading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_placement_equals_single_device(family, dtype, one_thread):
    model = tiny_model(family).to(dtype)
    ids = _ids(7)
    with torch.no_grad():
        hf = model(ids).logits
        want = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch")(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for strategy, plan in _plans(model).items():
        placed = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch", placement=plan, devices=DEVICES)
        with torch.no_grad():
            got = placed(ids).logits
        replicated = any(len(plan.replicas(n, e)) > 1 for n in plan.layer_names for e in range(plan.num_experts(n)))
        if replicated and dtype == torch.float32:
            # A replicated expert's rows run as two smaller GEMMs: same math, other blocking.
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=strategy)
        elif replicated:
            torch.testing.assert_close(got.float(), want.float(), **BF16, msg=strategy)
        else:
            assert torch.equal(got, want), strategy
        torch.testing.assert_close(got.float(), hf.float(), **(FP32 if dtype == torch.float32 else BF16))
        layers = hf_moe_opt.optimized_layers(placed)
        for name, layer in layers:
            store = layer.store
            assert isinstance(store, PlacedExpertStore)
            assert sum(store.stats()["rows_per_device"]) > 0
            fused = _fused_params(layer)
            assert all(p.device.type == "cpu" for p in fused.values())  # the state_dict copy, in host memory
            # Each device holds exactly its planned experts' slices, in compute layout.
            for d, group in enumerate(store.groups):
                experts = plan.experts_on(name, d)
                assert group.experts == experts
                full = layer.weights.tensors()
                for key, tensor in zip(("w1", "b1", "w2", "b2"), full, strict=True):
                    if tensor is None:
                        assert key not in group.tensors
                        continue
                    held = group.tensors[key]
                    assert held.shape[0] == len(experts) and held.dtype == dtype
                    assert torch.equal(held, tensor[experts]), (strategy, name, d, key)
                    assert held.data_ptr() != tensor.data_ptr()  # a copy, not the parameter
        placed_state = placed.state_dict()
        assert list(placed_state) == list(state)
        assert all(torch.equal(placed_state[k], v) and placed_state[k].dtype == v.dtype for k, v in state.items())
        hf_moe_opt.restore(placed)
        with torch.no_grad():
            assert torch.equal(placed(ids).logits, hf)


def test_fused_placed_model_survives_dtype_cast():
    model = tiny_model("gpt_oss")
    plan = _plans(model)["replicate"]
    reference = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch").to(torch.float64)
    placed = hf_moe_opt.optimize(model, backend="torch", placement=plan, devices=DEVICES).to(torch.float64)
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, reference(ids).logits, rtol=1e-10, atol=1e-10)
    for _, layer in hf_moe_opt.optimized_layers(placed):
        assert all(g.tensors["w1"].dtype == torch.float64 for g in layer.store.groups if g.experts)


def test_fused_placement_takes_over_offloaded_experts():
    """A fused ``experts`` module offloaded by accelerate (weights in its host map) is taken over."""
    from accelerate import cpu_offload

    model = tiny_model("qwen2_moe")
    ids = _ids(5)
    with torch.no_grad():
        want = model(ids).logits
    plan = _plans(model)["greedy"]
    for name, *_ in _find_blocks(model):
        cpu_offload(model.get_submodule(f"{name}.experts"), execution_device="cpu")
    assert any(p.device.type == "meta" for p in model.parameters())
    hf_moe_opt.optimize(model, backend="torch", placement=plan, devices=DEVICES)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, **FP32)


def test_fused_placement_refuses_offloaded_router():
    from accelerate import cpu_offload

    model = tiny_model("mixtral")
    plan = _plans(model)["greedy"]
    name = _find_blocks(model)[0][0]
    cpu_offload(model.get_submodule(f"{name}.gate"), execution_device="cpu")
    with pytest.raises(ValueError, match="offload hooks"):
        hf_moe_opt.optimize(model, placement=plan, devices=DEVICES)
    assert not hf_moe_opt.is_optimized(model)


# ------------------------------------------------------------------------------- device maps


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "jetmoe"])
def test_fused_device_map_keeps_experts_in_host_memory(family):
    model = tiny_model(family)
    plan = _plans(model)["replicate"]
    order = [n for n, _ in model.named_parameters()]
    if torch.cuda.device_count() < 2:  # without budgets the default GPUs 0 and 1 must exist
        with pytest.raises(ValueError, match="CUDA device.*devices="):
            plan.device_map(model)
    # Fake GPU ids: accelerate only reads the budgets given here, no device is touched.
    dm = plan.device_map(model, max_memory={0: 400_000, 1: 400_000, "cpu": 10**9})
    keys = list(dm)
    for k in keys:
        assert not any(o != k and o.startswith(k + ".") for o in keys), k
    for pname in order:
        assert any(pname == k or pname.startswith(k + ".") for k in keys), pname
    # JetMoE keeps its experts in two modules of the block, the others in one experts module.
    containers = ("input_linear", "output_linear") if family == "jetmoe" else ("experts",)
    for name in plan.layer_names:
        for c in containers:
            assert dm[f"{name}.{c}"] == "cpu"  # fused modules: host memory, sliced at optimize
            assert not any(k.startswith(f"{name}.{c}.") for k in keys)
    dense = {v for k, v in dm.items() if not k.endswith(containers)}
    assert dense <= {0, 1}  # shared experts and routers go to the GPUs
    assert [n for n, _ in model.named_parameters()] == order  # the map leaves the model as it was


def test_fused_device_map_budget_counts_planned_slices():
    model = tiny_model("mixtral")
    plan = _plans(model)["greedy"]
    block = _find_blocks(model)[0][3]
    expert_bytes = sum(p[0].numel() * p.element_size() for p in block.experts.parameters())
    per_device = max(len(plan.experts_on(n, d)) for n in plan.layer_names for d in range(2)) * 2 * expert_bytes
    with pytest.raises(ValueError, match="need"):
        plan.device_map(model, max_memory={0: per_device - 1, 1: per_device - 1, "cpu": 10**9})


def test_fused_device_map_loads_with_from_pretrained_and_optimizes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path)
    plan = _plans(model)["replicate"]
    dm = plan.device_map(model, devices=DEVICES, max_memory={"cpu": 10**9})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=dm).eval()
    ids = _ids(11)
    with torch.no_grad():
        want = model(ids).logits
    hf_moe_opt.optimize(loaded, backend="torch", placement=plan, devices=DEVICES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, **FP32)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_placed_copies_follow_weight_writes(family):
    """Per-device copies of fused experts (and replicas) are taken again after load_state_dict, and
    after in-place writes once sync_expert_copies is called; without it they would serve old weights."""
    model = tiny_model(family)
    ids = _ids(8)
    changed = {k: v * 1.5 if ".experts." in k or k.endswith("experts") else v for k, v in model.state_dict().items()}
    reference = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch")
    reference.load_state_dict(changed)
    with torch.no_grad():
        want = reference(ids).logits
    for name, plan in _plans(model).items():
        placed = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch", placement=plan, devices=DEVICES)
        with torch.no_grad():
            before = placed(ids).logits  # copies in use
            placed.load_state_dict(changed)
            got = placed(ids).logits
        assert not torch.allclose(before, want, atol=1e-3), name  # the change is visible at all
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

        fresh = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch", placement=plan, devices=DEVICES)
        with torch.no_grad():
            fresh(ids)
            for key, p in fresh.named_parameters():
                if ".experts." in key or key.endswith("experts"):
                    p.mul_(1.5)
            hf_moe_opt.sync_expert_copies(fresh)
            torch.testing.assert_close(fresh(ids).logits, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["longcat_flash", "inkling", "ergo", "laguna", "deepseek_v4", "zaya", "jetmoe"])
def test_newer_layer_kinds_under_placement(family, one_thread):
    """Zero-expert slots dropped from the dispatch (LongCat-Flash), per-token shared-expert gammas
    (Inkling), one top-1 row per slot with a per-expert norm (Ergo), a scaled routed output (Laguna)
    hash routing by token id (DeepSeek-V4) and a router state carried across layers (ZAYA1) through
    placed experts: the single-device result, and transformers'."""
    model = tiny_model(family)
    ids = _ids(7)
    with torch.no_grad():
        hf = model(ids).logits
        want = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch")(ids).logits
    plan = _plans(model)["round_robin"]
    placed = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch", placement=plan, devices=DEVICES)
    with torch.no_grad():
        got = placed(ids).logits
    if family == "deepseek_v4":
        # Its limited SwiGLU runs torch's CPU SiLU on a contiguous tensor whose length differs per device:
        # the same element may fall in the vectorised body or the scalar tail, one rounding apart.
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, hf, **FP32)
    assert all(isinstance(layer.store, PlacedExpertStore) for _, layer in hf_moe_opt.optimized_layers(placed))
