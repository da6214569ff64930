"""Single-process placement over several devices (CPU stand-ins) and accelerate device maps."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.api import _find_blocks
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.experts.store import ResidentStore
from hf_moe_opt.experts.torch_backend import torch_moe_ffn
from hf_moe_opt.placement import PlacementPlan, plan_placement, profile, synthetic_zipf_trace
from hf_moe_opt.placement.store import PlacedExpertStore, ReplicaTable

from .models import VOCAB, integer_expert_weights, random_routing, tiny_nllb, tiny_switch

DEVICES = ["cpu", "cpu", "cpu"]


def _batch(seed: int, batch: int = 3, src: int = 9, tgt: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, VOCAB, (batch, src), generator=g),
        "decoder_input_ids": torch.randint(2, VOCAB, (batch, tgt), generator=g),
    }


def _plans(model, num_devices: int) -> dict[str, PlacementPlan]:
    trace = profile(model, [_batch(50 + i, 4) for i in range(6)], progress=False)
    return {
        "round_robin": plan_placement(trace, num_devices, "round_robin"),
        "greedy": plan_placement(trace, num_devices, "greedy"),
        "replicate": plan_placement(trace, num_devices, "replicate", 1),
        "hand_replicas": _hand_plan(trace.layers, trace.num_experts, num_devices),
    }


def _hand_plan(layers, num_experts: int, num_devices: int) -> PlacementPlan:
    # Every expert on every device with uneven shares: every split path runs.
    shares = [0.5, 0.3, 0.2][:num_devices]
    shares = [s / sum(shares) for s in shares]
    experts = [[((e + i) % num_devices, shares[i]) for i in range(num_devices)] for e in range(num_experts)]
    return PlacementPlan(num_devices=num_devices, strategy="hand", layers={n: experts for n in layers})


def _unique_storage_bytes(model) -> int:
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(("make", "num_devices"), [(tiny_switch, 2), (tiny_nllb, 3)], ids=["switch-2", "nllb-3"])
def test_placed_store_equals_single_device(make, num_devices):
    model = make(num_experts=6)
    reference = hf_moe_opt.optimize(copy.deepcopy(model))
    batch = _batch(7)
    with torch.no_grad():
        want = reference(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for strategy, plan in _plans(model, num_devices).items():
        placed = hf_moe_opt.optimize(copy.deepcopy(model), placement=plan, devices=DEVICES[:num_devices])
        with torch.no_grad():
            got = placed(**batch).logits
        replicated = any(len(plan.replicas(n, e)) > 1 for n in plan.layer_names for e in range(6))
        if replicated:
            # A replicated expert's rows are split into smaller GEMMs: same math, other blocking.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=strategy)
        else:
            assert torch.equal(got, want), strategy
        layers = hf_moe_opt.optimized_layers(placed)
        assert all(isinstance(layer.store, PlacedExpertStore) for _, layer in layers)
        rows = [sum(layer.store.stats()["rows_per_device"]) for _, layer in layers]
        assert all(r > 0 for r in rows)
        # Names and values unchanged; parameters are views of the per-device stacks.
        placed_state = placed.state_dict()
        assert list(placed_state) == list(state)
        for k, v in state.items():
            assert torch.equal(placed_state[k], v), k
        if not replicated:
            params = sum(p.numel() * p.element_size() for p in placed.parameters())
            assert _unique_storage_bytes(placed) == params
        hf_moe_opt.restore(placed)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("replicated", [False, True], ids=["spread", "replicated"])
def test_placed_store_equals_resident_store_bitwise(top_k, replicated):
    # Dropped assignments and top-k > 1 through the placed store's unsort and slot sum: integer rows
    # and weights make every GEMM exact, so the outputs must match bit for bit, replicas included.
    num_experts, hidden, ffn = 6, 16, 24
    layer = [[(e % 3, 1.0)] for e in range(num_experts)]
    if replicated:
        layer = [[((e + i) % 3, s) for i, s in enumerate((0.5, 0.3, 0.2))] for e in range(num_experts)]
    table = ReplicaTable(PlacementPlan(num_devices=3, strategy="hand", layers={"l": layer}), "l", num_experts)
    placed = PlacedExpertStore(integer_expert_weights(num_experts, hidden, ffn), table, DEVICES)
    resident = ResidentStore(integer_expert_weights(num_experts, hidden, ffn))
    act = Activation("relu", torch.relu)
    for seed, (tokens, drop) in enumerate([(1, 0.0), (23, 0.0), (23, 0.4), (9, 1.0)]):
        x, plan = random_routing(seed, tokens, top_k, hidden, num_experts, drop)
        for scale in (1.0, 0.5):
            got = placed.run(x, plan, lambda d, n: torch_moe_ffn, act, scale)
            want = resident.run(x, plan, lambda d, n: torch_moe_ffn, act, scale)
            assert torch.equal(got, want), (seed, scale)
    x, plan = random_routing(0, 0, top_k, hidden, num_experts, 0.0)  # no tokens
    assert placed.run(x, plan, lambda d, n: torch_moe_ffn, act, 1.0).shape == (0, hidden)


def test_replica_split_follows_shares_and_is_deterministic():
    from hf_moe_opt.dispatch import make_plan

    plan = PlacementPlan(
        num_devices=2,
        strategy="hand",
        layers={"l": [[(0, 0.25), (1, 0.75)], [(1, 1.0)], [(0, 1.0)]]},
    )
    table = ReplicaTable(plan, "l", 3)
    expert_index = torch.tensor([[0]] * 8 + [[1]] * 2 + [[2]] * 3)
    keep = torch.ones_like(expert_index, dtype=torch.bool)
    keep[-1] = False
    dispatch = make_plan(expert_index, torch.ones(13, 1), keep, 3)
    targets = table.targets(dispatch).tolist()
    # Expert 0: 8 rows, first 2 (25%) on device 0, the rest on device 1; dropped row -> 2.
    assert targets == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 2]
    assert table.targets(dispatch).tolist() == targets


def test_placement_errors_are_clear():
    model = tiny_switch(num_experts=4)
    names = [b[0] for b in _find_blocks(model)]
    plan = PlacementPlan(num_devices=2, strategy="x", layers={names[0]: [[(e % 2, 1.0)] for e in range(4)]})
    with pytest.raises(ValueError, match="no entry for MoE layers"):
        hf_moe_opt.optimize(copy.deepcopy(model), placement=plan, devices=["cpu", "cpu"])
    trace = synthetic_zipf_trace(len(names), 8, 4, 64, 1, layer_names=names)
    with pytest.raises(ValueError, match="has 4 experts but the placement plan has 8"):
        hf_moe_opt.optimize(copy.deepcopy(model), placement=plan_placement(trace, 2), devices=["cpu", "cpu"])
    good = plan_placement(synthetic_zipf_trace(len(names), 4, 4, 64, 1, layer_names=names), 2)
    with pytest.raises(ValueError, match="devices= lists 3"):
        hf_moe_opt.optimize(copy.deepcopy(model), placement=good, devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="needs placement"):
        hf_moe_opt.optimize(copy.deepcopy(model), devices=["cpu"])
    with pytest.raises(RuntimeError, match="initialised process group"):
        hf_moe_opt.optimize(copy.deepcopy(model), expert_parallel=True, placement=good)
    assert not hf_moe_opt.is_optimized(model)
    # A plan for another model places layers this one lacks: said, not silently ignored.
    extra = PlacementPlan(2, "x", {**good.layers, "not.a.layer": [[(0, 1.0)]] * 4})
    with pytest.warns(UserWarning, match="not.a.layer"):
        hf_moe_opt.optimize(copy.deepcopy(model), placement=extra, devices=["cpu", "cpu"])


def test_placed_model_survives_dtype_cast():
    model = tiny_nllb(num_experts=4)
    names = [b[0] for b in _find_blocks(model)]
    plan = plan_placement(synthetic_zipf_trace(len(names), 4, 4, 64, 2, layer_names=names), 2, "replicate", 1)
    reference = hf_moe_opt.optimize(copy.deepcopy(model)).to(torch.float64)
    placed = hf_moe_opt.optimize(model, placement=plan, devices=["cpu", "cpu"]).to(torch.float64)
    batch = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(placed(**batch).logits, reference(**batch).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU beside the CPU")
def test_restore_brings_placed_experts_back_to_the_layer_device():
    # The restored transformers block runs every expert on its inputs' device: experts left on their
    # planned devices would make its forward fail.
    model = tiny_switch(num_experts=4).cuda()
    names = [b[0] for b in _find_blocks(model)]
    plan = PlacementPlan(num_devices=2, strategy="hand", layers={n: [[(e % 2, 1.0)] for e in range(4)] for n in names})
    batch = {k: v.cuda() for k, v in _batch(5).items()}
    with torch.no_grad():
        want = model(**batch).logits
    hf_moe_opt.restore(hf_moe_opt.optimize(model, placement=plan, devices=["cuda:0", "cpu"]))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- device maps


def _plan_for(model, num_devices: int, strategy: str = "replicate") -> PlacementPlan:
    names = [b[0] for b in _find_blocks(model)]
    experts = model.config.num_experts
    trace = synthetic_zipf_trace(len(names), experts, 8, 256, 2, seed=1, layer_names=names)
    return plan_placement(trace, num_devices, strategy, 1 if strategy == "replicate" else 0)


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_device_map_puts_experts_on_planned_devices(make):
    model = make(num_experts=4)
    plan = _plan_for(model, 2)
    # Fake GPU ids: accelerate only reads the budgets given here, no device is touched.
    budget = {0: 400_000, 1: 400_000, "cpu": 10**9}
    dm = plan.device_map(model, max_memory=budget)
    keys = list(dm)
    # No key contains another (what from_pretrained/accelerate expect) and every parameter is covered.
    for k in keys:
        assert not any(o != k and o.startswith(k + ".") for o in keys), k
    for pname, _ in model.named_parameters():
        assert any(pname == k or pname.startswith(k + ".") for k in keys), pname
    for name in plan.layer_names:
        for e in range(4):
            assert dm[f"{name}.experts.expert_{e}"] == plan.replicas(name, e)[0][0]
    # Dense modules come from accelerate: only budget devices, and the routers sit beside their block.
    assert set(dm.values()) <= {0, 1, "cpu"}
    # The map does not change the model.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in make(num_experts=4).named_parameters()]


def test_device_map_custom_devices_and_budget_errors():
    model = tiny_switch(num_experts=4)
    plan = _plan_for(model, 2, "greedy")
    dm = plan.device_map(model, devices=["cpu", "cpu"], max_memory={"cpu": 10**9})
    assert set(dm.values()) == {"cpu"}
    with pytest.raises(ValueError, match="need"):
        plan.device_map(model, max_memory={0: 1000, 1: 1000, "cpu": 10**9})


def test_device_map_loads_with_from_pretrained_and_optimizes(tmp_path):
    from transformers import SwitchTransformersForConditionalGeneration

    model = tiny_switch(num_experts=4)
    model.save_pretrained(tmp_path)
    plan = _plan_for(model, 2)
    dm = plan.device_map(model, devices=["cpu", "cpu"], max_memory={"cpu": 10**9})
    loaded = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path, device_map=dm).eval()
    reference = hf_moe_opt.optimize(copy.deepcopy(model))
    hf_moe_opt.optimize(loaded, placement=plan, devices=["cpu", "cpu"])
    batch = _batch(11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_bad_devices_and_expert_parallel_arguments_are_explained():
    """A plan's devices= must be a list of real devices; expert_parallel= True/False or a group. Each
    mistake raises before anything is built, and the model stays as it was."""
    model = tiny_switch(num_experts=6)
    plan = _plans(model, 2)["round_robin"]
    cases = [
        (dict(placement=plan, devices="cpu"), TypeError, "one device per plan device"),
        (dict(placement=plan, devices=["cpu", "bogus"]), ValueError, "not a torch device"),
        (dict(placement=plan, devices=["cuda:0", f"cuda:{torch.cuda.device_count() + 1}"]), ValueError, "visible"),
        (dict(expert_parallel="yes"), TypeError, "expert_parallel takes"),
        (dict(fuse_dense="no"), TypeError, "fuse_dense must be True or False"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            hf_moe_opt.optimize(model, **kwargs)
        assert not hf_moe_opt.is_optimized(model), kwargs


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_replicas_follow_load_state_dict(make):
    """A load tells each expert module as soon as it is loaded: the replicas (copies on other devices)
    are taken once the whole load is done, so every replica serves the loaded weights."""
    model, other = make(num_experts=4, seed=0), make(num_experts=4, seed=1)
    layers = [n for n, _ in hf_moe_opt.optimized_layers(hf_moe_opt.optimize(copy.deepcopy(model)))]
    plan = _hand_plan(layers, 4, 2)
    placed = hf_moe_opt.optimize(copy.deepcopy(model), placement=plan, devices=DEVICES[:2])
    batch = _batch(3)
    with torch.no_grad():
        placed(**batch)  # copies in use
        placed.load_state_dict(other.state_dict())
        got = placed(**batch).logits
        want = hf_moe_opt.optimize(copy.deepcopy(other))(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    store = hf_moe_opt.optimized_layers(placed)[0][1].store
    for name in ("w1", "w2"):  # expert 0's copies on both devices are the same loaded values
        first, second = (g.tensors[name][g.experts.index(0)] for g in store.groups)
        assert torch.equal(first, second)


def test_a_failure_while_placing_leaves_the_model_as_it_was(monkeypatch):
    """All or nothing: experts that cannot be placed (out of memory on a device, simulated here) leave
    the model unoptimized and runnable; the meta device is refused before anything is built."""
    import hf_moe_opt.placement.store as store_module

    model = tiny_switch(num_experts=4)
    layers = [n for n, _ in hf_moe_opt.optimized_layers(hf_moe_opt.optimize(copy.deepcopy(model)))]
    plan = PlacementPlan(num_devices=2, strategy="hand", layers={n: [[(e % 2, 1.0)] for e in range(4)] for n in layers})
    batch = _batch(4)
    with torch.no_grad():
        want = model(**batch).logits
    with pytest.raises(ValueError, match="meta device"):
        hf_moe_opt.optimize(model, placement=plan, devices=["cpu", "meta"])
    original = store_module._place_stacks

    def out_of_memory(weights, groups, home):
        if any(group.experts for group in groups[1:]):
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return original(weights, groups, home)

    monkeypatch.setattr(store_module, "_place_stacks", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        hf_moe_opt.optimize(model, placement=plan, devices=DEVICES[:2])
    assert not hf_moe_opt.is_optimized(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


def test_restore_frees_the_replicas():
    """After restore, the expert parameters hold their own data only: no stack of replicas (copies of
    experts homed on another device) is kept alive behind them."""
    model = tiny_switch(num_experts=4)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = [n for n, _ in hf_moe_opt.optimized_layers(hf_moe_opt.optimize(copy.deepcopy(model)))]
    batch = _batch(6)
    with torch.no_grad():
        want = model(**batch).logits
    hf_moe_opt.optimize(model, placement=_hand_plan(layers, 4, 2), devices=DEVICES[:2])
    hf_moe_opt.restore(model)
    assert _unique_storage_bytes(model) == nbytes
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
