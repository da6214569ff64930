"""Expert buffering (``optimize(model, expert_cache=...)``): exactness, policy bookkeeping, budgets, errors."""

import copy
import math
import warnings

import pytest
import torch

import hf_moe_opt
from hf_moe_opt.cache import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    CacheBudget,
    CachedExpertStore,
    allot_slots,
    effective_experts,
    offload_device_map,
    parse_bytes,
    simulate,
    trace_from_counts,
)
from hf_moe_opt.cache.budget import LayerGeometry, layer_demand, slots_per_layer

from .models import VOCAB, offloading_hooks, tiny_nllb, tiny_switch

FAMILIES = {"switch": tiny_switch, "nllb": tiny_nllb}
NUM_EXPERTS = 8
# Where the dense weights run: on CUDA machines the slots are on the GPU and the copies are real.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quiet_optimize(model, **kw):
    """optimize; on machines without CUDA the pinned-memory fallback warns, which these tests expect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return hf_moe_opt.optimize(model, capacity="none", **kw)


def _batches(n=3, batch=3, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(3, VOCAB, (batch, seq), generator=g).to(DEVICE),
            torch.randint(3, VOCAB, (batch, 5), generator=g).to(DEVICE),
        )
        for _ in range(n)
    ]


def _record_counts(model):
    """Wrap every layer's store to record each call's per-expert counts (the routing trace)."""
    record = {}
    for name, layer in hf_moe_opt.optimized_layers(model):
        inner = layer.store.run

        def run(x, plan, *args, _inner=inner, _name=name):
            record.setdefault(_name, []).append(plan.counts.tolist())
            return _inner(x, plan, *args)

        layer.store.run = run
    return record


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """A base model, its resident-optimized outputs on fixed batches, and the routing trace per layer."""
    base = FAMILIES[request.param](num_experts=NUM_EXPERTS).to(DEVICE)
    resident = copy.deepcopy(base)
    hf_moe_opt.optimize(resident, capacity="none")
    counts = _record_counts(resident)
    batches = _batches()
    with torch.no_grad():
        outs = [resident(input_ids=i, decoder_input_ids=d).logits for i, d in batches]
    return {
        "name": request.param,
        "base": base,
        "resident": resident,
        "batches": batches,
        "outs": outs,
        "counts": counts,
    }


def _run(model, batches):
    with torch.no_grad():
        return [model(input_ids=i, decoder_input_ids=d).logits for i, d in batches]


@pytest.mark.parametrize(
    "policy,slots",
    [(p, 2) for p in POLICY_NAMES] + [("lifo", 1), ("lru", 1), ("lifo", 5), ("lfu", 3), ("lifo", NUM_EXPERTS)],
)
def test_outputs_exact_and_stats_match_simulator(family, policy, slots):
    model = copy.deepcopy(family["base"])
    _quiet_optimize(model, expert_cache=slots, cache_policy=policy)
    outs = _run(model, family["batches"])
    for a, b in zip(family["outs"], outs, strict=True):
        assert torch.equal(a, b)
    stats = hf_moe_opt.stats(model)
    assert len(stats) == 4
    for name, st in stats.items():
        trace = trace_from_counts(family["counts"][name])
        sim = simulate(trace, policy, slots)
        assert (st["hits"], st["misses"]) == (sim.hits, sim.misses), name
        assert st["steps"] == len(trace)
        assert st["num_slots"] == slots and st["policy"] == policy
        assert len(st["resident"]) <= slots
        layer = dict(hf_moe_opt.optimized_layers(model))[name]
        assert st["bytes_copied"] == st["misses"] * layer.store.expert_nbytes
        assert st["copy_time_ms"] >= 0 and st["stall_time_ms"] >= 0 and st["host_time_ms"] > 0
        needs_chunks = any(sum(c > 0 for c in step) > slots for step in family["counts"][name])
        assert (st["chunked_steps"] > 0) == needs_chunks
        # Cold start, slots never freed: every load past the first fill evicts.
        assert st["evictions"] == st["misses"] - len(st["resident"])
    if slots == 1:
        assert any(st["chunked_steps"] > 0 for st in stats.values())  # the chunked path ran
    hf_moe_opt.reset_stats(model)
    after = hf_moe_opt.stats(model)
    assert all(st["hits"] == st["misses"] == st["bytes_copied"] == st["host_time_ms"] == 0 for st in after.values())
    assert all(st["evictions"] == st["chunked_steps"] == st["prefetched"] == 0 for st in after.values())
    assert [st["resident"] for st in after.values()] == [st["resident"] for st in stats.values()]


def test_pinned_experts_stay_resident(family):
    model = copy.deepcopy(family["base"])
    names = [n for n, _ in hf_moe_opt.optimized_layers(family["resident"])]
    _quiet_optimize(model, expert_cache=3, cache_policy="lru", pinned_experts={names[0]: [5, 2]})
    outs = _run(model, family["batches"])
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], outs, strict=True))
    st = hf_moe_opt.stats(model)[names[0]]
    sim = simulate(trace_from_counts(family["counts"][names[0]]), "lru", 3, pinned=[5, 2])
    assert (st["hits"], st["misses"]) == (sim.hits, sim.misses)
    used = {e for step in family["counts"][names[0]] for e, c in enumerate(step) if c}
    assert {5, 2} & used <= set(st["resident"])
    assert st["pinned_experts"] == [5, 2]


def test_generate_identical_tokens(family):
    model = copy.deepcopy(family["base"])
    _quiet_optimize(model, expert_cache=2)
    ids = family["batches"][0][0][:2]
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        want = family["resident"].generate(ids, **kw)
        got = model.generate(ids, **kw)
    assert torch.equal(want, got)


def test_state_dict_unchanged_one_copy_and_restore(family):
    base = family["base"]
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _quiet_optimize(model, expert_cache=0.25)
    after = model.state_dict()
    assert list(after) == list(before)
    # Values and dtypes unchanged; on CUDA machines the experts now live in host memory.
    assert all(torch.equal(after[k].cpu(), v.cpu()) and after[k].dtype == v.dtype for k, v in before.items())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == nbytes  # the host stacks are the parameters: no second copy
    for _, layer in hf_moe_opt.optimized_layers(model):
        assert isinstance(layer.store, CachedExpertStore)
        assert layer.store.num_slots == 2  # 25% of 8
        stack = layer.weights.w1.tensor
        for j, p in enumerate(layer.weights.w1.params):
            assert p.data_ptr() == stack[j].data_ptr()
    _run(model, family["batches"][:1])
    hf_moe_opt.restore(model)
    assert not hf_moe_opt.is_optimized(model)
    with torch.no_grad():
        ids, dec = family["batches"][0]
        want = base(input_ids=ids, decoder_input_ids=dec).logits
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(want, got)


def test_byte_budget_even_split(family):
    model = copy.deepcopy(family["base"])
    layers = hf_moe_opt.optimized_layers(family["resident"])
    expert_bytes = sum(p.numel() * p.element_size() for p in layers[0][1].experts["expert_0"].parameters())
    _quiet_optimize(model, expert_cache=str(expert_bytes * 13))  # 13 slots over 4 layers: 4, 3, 3, 3
    slots = [st["num_slots"] for st in hf_moe_opt.stats(model).values()]
    assert slots == [4, 3, 3, 3]
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], _run(model, family["batches"]), strict=True))


def test_byte_budget_by_demand(family):
    model = copy.deepcopy(family["base"])
    names = [n for n, _ in hf_moe_opt.optimized_layers(family["resident"])]
    layer = dict(hf_moe_opt.optimized_layers(family["resident"]))[names[0]]
    expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts["expert_0"].parameters())
    # Layer 0 spreads its tokens over all 8 experts, the others over one: layer 0 gets most slots.
    uniform, peaked = [10] * NUM_EXPERTS, [80] + [0] * (NUM_EXPERTS - 1)
    demand = {names[0]: uniform, names[1]: peaked, names[2]: peaked, names[3]: peaked}
    _quiet_optimize(model, expert_cache=CacheBudget(expert_bytes * 12, demand=demand))
    slots = [st["num_slots"] for st in hf_moe_opt.stats(model).values()]
    assert slots == [8, 2, 1, 1]  # 1 each, then 8 more by demand 8 : 1 : 1 : 1 (ties to the earlier layer)
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], _run(model, family["batches"]), strict=True))


def test_byte_budget_by_demand_from_a_profiled_trace(family):
    """The documented recipe: ``CacheBudget(budget, demand=hf_moe_opt.profile(model, batches))``."""
    model = copy.deepcopy(family["base"])
    batches = [{"input_ids": i, "decoder_input_ids": d} for i, d in family["batches"][:1]]
    trace = hf_moe_opt.profile(family["resident"], batches, progress=False)
    layer = hf_moe_opt.optimized_layers(family["resident"])[0][1]
    expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts["expert_0"].parameters())
    _quiet_optimize(model, expert_cache=CacheBudget(expert_bytes * 12, demand=trace))
    slots = [st["num_slots"] for st in hf_moe_opt.stats(model).values()]
    assert sum(slots) == 12 and min(slots) >= 1
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], _run(model, family["batches"]), strict=True))


def test_cache_follows_weight_writes(family):
    """The slots hold copies: load_state_dict empties the cache, and so does sync_expert_copies after
    an in-place write; the next steps serve the new weights, equal to a resident layer's."""
    changed = {k: v * 1.5 if ".experts." in k else v for k, v in family["base"].state_dict().items()}
    resident = copy.deepcopy(family["base"])
    hf_moe_opt.optimize(resident, capacity="none")
    resident.load_state_dict(changed)
    want = _run(resident, family["batches"])

    model = copy.deepcopy(family["base"])
    _quiet_optimize(model, expert_cache=3)
    _run(model, family["batches"])  # slots filled with the old weights
    model.load_state_dict(changed)
    assert all(torch.equal(a, b) for a, b in zip(want, _run(model, family["batches"]), strict=True))

    model = copy.deepcopy(family["base"])
    _quiet_optimize(model, expert_cache=3)
    _run(model, family["batches"])
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".experts." in key:
                p.mul_(1.5)
    stale = _run(model, family["batches"])
    assert not all(torch.equal(a, b) for a, b in zip(want, stale, strict=True))  # why the call is needed
    hf_moe_opt.sync_expert_copies(model)
    assert all(torch.equal(a, b) for a, b in zip(want, _run(model, family["batches"]), strict=True))

    # assign=True swaps in new parameter objects the layer does not hold: an error, never the old weights.
    for kwargs in ({"expert_cache": 3}, {}):
        model = copy.deepcopy(family["base"])
        _quiet_optimize(model, **kwargs)
        with pytest.raises(RuntimeError, match="assign=True"):
            model.load_state_dict(changed, assign=True)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1.5 tb") == 15 * 10**11
    assert parse_bytes("4096") == 4096
    assert parse_bytes("2KiB") == 2048
    assert parse_bytes("2.01KB") == 2010 and parse_bytes("8.04KB") == 8040  # no float rounding down
    for bad in ["", "GB", "12 parsecs", "-1GB", "0", "1e400"]:
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert parse_bytes("3mb") == parse_bytes("3MB") == 3 * 10**6  # all lower case: bytes, as documented
    for bits in ["3Mb", "2Gib", "1.5 Tb", "8Kb"]:  # an upper-case prefix and a lower-case b: bits
        with pytest.raises(ValueError, match="reads as bits"):
            parse_bytes(bits)


def test_allotment():
    layers = [LayerGeometry(f"l{i}", 8, 100) for i in range(3)]
    assert allot_slots(300, layers) == [1, 1, 1]
    assert allot_slots(1000, layers) == [4, 3, 3]
    assert allot_slots(2400, layers) == [8, 8, 8]
    mixed = [LayerGeometry("a", 4, 100), LayerGeometry("b", 16, 50, pinned=2)]
    # Evenly means the same fraction of each layer's experts: 4 of 4 and 16 of 16 only at full size.
    assert allot_slots(100 * 2 + 50 * 8, mixed) == [2, 8]
    assert effective_experts([1, 1, 1, 1]) == pytest.approx(4.0)
    assert effective_experts([5, 0, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="below one expert per layer"):
        allot_slots(299, layers)
    with pytest.raises(ValueError, match="use no cache"):
        allot_slots(2401, layers)


def test_allotment_worked_by_hand():
    """Each case worked on paper: the extra slots go one at a time to the smallest (slots + 1) / demand
    (ties to the earlier layer), skipping a layer whose expert no longer fits."""
    # a's 100-byte expert stops fitting after the minimum (70 bytes left); b's 30-byte ones still do.
    small = [LayerGeometry("a", 4, 100), LayerGeometry("b", 4, 30)]
    assert allot_slots(200, small) == [1, 3]
    assert allot_slots(290, small) == [2, 3]  # a, b, (a no longer fits), b
    # A layer whose experts are all pinned keeps exactly its experts; the spare slot goes to b.
    pinned = [LayerGeometry("a", 4, 100, pinned=4), LayerGeometry("b", 8, 100)]
    assert allot_slots(600, pinned) == [4, 2]
    assert slots_per_layer(4, pinned) == [4, 4]
    # Demand: a spreads over 8 experts (8.0), b sends everything to one (1.0), c is missing from the
    # record and takes the mean (4.5). 9 extra slots: the nine smallest of a: 2/8, 3/8, ..., c: 2/4.5,
    # 3/4.5, ..., b: 2/1 are six of a's and three of c's.
    three = [LayerGeometry(n, 8, 100) for n in "abc"]
    demand = {"a": [10] * 8, "b": [80] + [0] * 7}
    assert layer_demand(demand, three) == pytest.approx([8.0, 1.0, 4.5])
    assert allot_slots(1200, three, demand) == [7, 1, 4]
    # A [steps, E] record sums over steps: a = [24, 8, 0, 0] (exp(entropy) = 1.75), b = [2, 2, 0, 0] (2.0);
    # the one extra slot goes to b (2 / 2.0 < 2 / 1.75).
    two = [LayerGeometry("a", 4, 100), LayerGeometry("b", 4, 100)]
    steps = {"a": [[8, 0, 0, 0]] * 3 + [[0, 8, 0, 0]], "b": [[2, 2, 0, 0]]}
    assert layer_demand(steps, two) == pytest.approx([effective_experts([24, 8, 0, 0]), 2.0])
    assert effective_experts([24, 8, 0, 0]) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert allot_slots(300, two, steps) == [1, 2]
    # A layer the record never routed to counts as one expert of demand, not zero.
    idle = {"a": [0, 0, 0, 0], "b": [1, 1, 1, 1]}
    assert layer_demand(idle, two) == [1.0, 4.0]
    assert allot_slots(400, two, idle) == [1, 3]
    # Fractions round down, but not below what the decimal fraction means (0.57 * 100 is 56.999...).
    assert slots_per_layer(0.57, [LayerGeometry("a", 100, 1)]) == [57]
    assert slots_per_layer(0.29, [LayerGeometry("a", 100, 1)]) == [29]


def test_numpy_scalars_size_the_cache():
    import numpy as np

    for spec, slots in ((np.int64(3), 3), (np.float32(0.5), NUM_EXPERTS // 2)):
        model = tiny_switch(num_experts=NUM_EXPERTS)
        _quiet_optimize(model, expert_cache=spec)
        assert {s["num_slots"] for s in hf_moe_opt.stats(model).values()} == {slots}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"expert_cache": "1KB"}, "below one expert per layer"),
        ({"expert_cache": "10GiB"}, "larger than all experts.*use no cache"),
        ({"expert_cache": NUM_EXPERTS + 1}, "use no cache"),
        ({"expert_cache": 0}, "at least one expert"),
        ({"expert_cache": 1.5}, r"\(0, 1\]"),
        ({"expert_cache": 0.0}, r"\(0, 1\]"),
        ({"expert_cache": 2, "cache_policy": "belady"}, "unknown cache_policy"),
        ({"expert_cache": 2, "pinned_experts": {"nope": [0]}}, "does not have"),
        ({"expert_cache": 2, "pinned_experts": [0, 1]}, "no free slot next to the 2 pinned experts.*at least 3"),
        ({"expert_cache": 2, "pinned_experts": [9]}, "out of range"),
        ({"expert_cache": 2, "pinned_experts": [0, 0]}, "repeat an id"),  # not "no free slot"
        ({"expert_cache": "2GiB", "pinned_experts": [1, 1]}, "repeat an id"),
        ({"cache_policy": "lru"}, "only with expert_cache"),
        ({"pinned_experts": [0]}, "only with expert_cache"),
        ({"cache_prefetch": True}, "only with expert_cache"),
        ({"cache_policy_options": {"half_life": 8}}, "only with expert_cache"),
        ({"expert_cache": 2, "cache_policy": "lru", "cache_policy_options": {"half_life": 8}}, "takes no options"),
        ({"expert_cache": 2, "cache_policy": "lfru", "cache_policy_options": {"speed": 1}}, "does not take"),
        ({"expert_cache": "lots"}, "cannot read"),
    ],
)
def test_errors_leave_the_model_untouched(kwargs, match):
    model = tiny_switch(num_experts=NUM_EXPERTS)
    with pytest.raises(ValueError, match=match):
        hf_moe_opt.optimize(model, **kwargs)
    assert not hf_moe_opt.is_optimized(model)


def test_type_errors():
    model = tiny_switch(num_experts=4)
    for bad in [True, [1, 2], {"a": 1}]:
        with pytest.raises(TypeError):
            hf_moe_opt.optimize(model, expert_cache=bad)
    with pytest.raises(TypeError, match="cache_prefetch"):
        hf_moe_opt.optimize(model, expert_cache=2, cache_prefetch="yes")
    with pytest.raises(TypeError, match="cache_policy_options"):
        hf_moe_opt.optimize(model, expert_cache=2, cache_policy_options=[("half_life", 8)])
    for pinned in ([1.7], [True], ["3"], 3, {"encoder.block.1.layer.1.mlp": 3}):  # never truncated or guessed
        with pytest.raises(TypeError, match="pinned_experts"):
            hf_moe_opt.optimize(model, expert_cache=2, pinned_experts=pinned)
    assert not hf_moe_opt.is_optimized(model)
    with pytest.raises(ValueError, match="finite"):
        hf_moe_opt.optimize(
            model,
            expert_cache=CacheBudget("96KiB", demand={"encoder.block.1.layer.1.mlp": [1.0, float("nan"), 2.0, 0.0]}),
        )
    assert not hf_moe_opt.is_optimized(model)


def test_pinned_experts_from_ranges_and_arrays():
    import numpy as np

    model = tiny_switch(num_experts=4)
    for pinned in (range(1), np.array([0]), torch.tensor([0])):
        _quiet_optimize(model, expert_cache=2, pinned_experts=pinned)
        assert all(st["pinned_experts"] == [0] for st in hf_moe_opt.stats(model).values())
        hf_moe_opt.restore(model)


def test_policy_options_reach_every_layer():
    model = tiny_switch(num_experts=NUM_EXPERTS).to(DEVICE)
    _quiet_optimize(model, expert_cache=3, cache_policy="lfru", cache_policy_options={"half_life": 7.0})
    policies = [layer.store.policy for _, layer in hf_moe_opt.optimized_layers(model)]
    assert policies and all(p.name == "lfru" and "half_life=7.0" in repr(p) for p in policies)


def test_default_policy_is_the_documented_one():
    import inspect

    assert inspect.signature(hf_moe_opt.optimize).parameters["cache_policy"].default == DEFAULT_POLICY
    assert inspect.signature(CachedExpertStore).parameters["policy"].default == DEFAULT_POLICY
    assert DEFAULT_POLICY in POLICY_NAMES
    model = tiny_switch(num_experts=NUM_EXPERTS).to(DEVICE)
    _quiet_optimize(model, expert_cache=3)
    policies = [layer.store.policy for _, layer in hf_moe_opt.optimized_layers(model)]
    assert policies and all(p.name == DEFAULT_POLICY for p in policies)
    # A policy other than the default without expert_cache is refused (it would have no effect).
    hf_moe_opt.restore(model)
    with pytest.raises(ValueError, match="only with expert_cache"):
        hf_moe_opt.optimize(model, cache_policy="lifo")


def _decode_like_inputs(d_model: int, steps: int, seed: int) -> list[torch.Tensor]:
    """One token per call from a few recurring prototypes: decode steps whose experts recur."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, d_model, generator=g)
    picks = torch.randint(0, 4, (steps,), generator=g)
    return [(protos[i] + 0.01 * torch.randn(d_model, generator=g)).view(1, 1, d_model) for i in picks]


class _Stack(torch.nn.Module):
    """A model's sparse blocks applied one after another with residuals (what decode steps see)."""

    def __init__(self, blocks, config):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.config = config

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


@pytest.mark.parametrize("family", ["switch", "nllb"])
@pytest.mark.parametrize("policy", ["lifo", "adaptive"])
def test_prefetch_keeps_outputs_and_loads_ahead(family, policy):
    """Look-ahead: each layer guesses the next cached layer's experts from its own input and loads them
    early. Outputs stay the resident layers'; the guesses are counted and (mostly) used."""
    base = FAMILIES[family](num_experts=NUM_EXPERTS, sparse_step=1, expert_capacity=64)
    sparse = [m for m in base.modules() if type(m).__name__.endswith("SparseMLP")]
    stack = _Stack([copy.deepcopy(m) for m in sparse[:3]], base.config).to(DEVICE).eval()
    # Later layers route like the first one (copied routers), so the guesses can be right.
    for block in stack.blocks[1:]:
        block.router.load_state_dict(stack.blocks[0].router.state_dict())
    resident, plain = copy.deepcopy(stack), copy.deepcopy(stack)
    hf_moe_opt.optimize(resident, capacity="none", backend="torch")
    _quiet_optimize(plain, expert_cache=2, cache_policy=policy, backend="torch")
    _quiet_optimize(stack, expert_cache=2, cache_policy=policy, backend="torch", cache_prefetch=True)
    stores = [layer.store for _, layer in hf_moe_opt.optimized_layers(stack)]
    assert all(s.prefetch and s._predictor is not None for s in stores)
    d_model = stores[0].weights.w1.tensor.shape[2]
    with torch.no_grad():
        for h in _decode_like_inputs(d_model, 40, seed=3):
            h = h.to(DEVICE)
            want = resident(h)
            assert torch.equal(plain(h), want)
            assert torch.equal(stack(h), want)
    # The chain of calls was learned: layer i runs before layer i + 1, the last before the first.
    assert [s._next() for s in stores] == stores[1:] + stores[:1]
    stats = hf_moe_opt.stats(stack)
    assert sum(v["prefetched"] for v in stats.values()) > 0
    assert sum(v["prefetch_hits"] for v in stats.values()) > 0
    plain_stats = hf_moe_opt.stats(plain)
    assert all(v["prefetched"] == 0 and v["prefetch_hits"] == 0 for v in plain_stats.values())
    # Loads ahead of the step turn some of the step's misses into hits.
    misses = sum(v["misses"] for v in stats.values())
    assert misses < sum(v["misses"] for v in plain_stats.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies run beside the compute only on a GPU")
def test_prefetch_wrong_guesses_never_expose_a_copy_in_flight():
    """Unused prefetches are not waited for at once; a later step that needs one of those experts must
    wait for its copy. Experts of 134 MB take about 2.5 ms to copy, far longer than a decode step's
    host work, so a missing wait would read half-copied weights."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    cfg = SwitchTransformersConfig(d_model=1024, d_ff=16384, num_experts=4, expert_capacity=1 << 20)
    torch.manual_seed(0)
    stack = _Stack([SwitchTransformersSparseMLP(cfg) for _ in range(2)], cfg).to(DEVICE).eval()
    resident = copy.deepcopy(stack)
    hf_moe_opt.optimize(resident, capacity="none", backend="torch")
    _quiet_optimize(stack, expert_cache=2, cache_policy="lifo", backend="torch", cache_prefetch=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(30):
            h = torch.randn(1, 1, 1024, generator=g).to(DEVICE)
            assert torch.equal(stack(h), resident(h))
    stats = hf_moe_opt.stats(stack).values()
    assert sum(v["prefetched"] for v in stats) > sum(v["prefetch_hits"] for v in stats) > 0


def test_prefetch_chains_stay_within_a_model():
    # Two cached models on one device, their calls interleaved (as a paired benchmark or two pipelines
    # do): each learns its own layer order and prefetches only into its own slots.
    base = FAMILIES["switch"](num_experts=NUM_EXPERTS, sparse_step=1, expert_capacity=64)
    sparse = [m for m in base.modules() if type(m).__name__.endswith("SparseMLP")]
    stacks = [_Stack([copy.deepcopy(m) for m in sparse[:3]], base.config).to(DEVICE).eval() for _ in range(2)]
    for stack in stacks:
        _quiet_optimize(stack, expert_cache=2, backend="torch", cache_prefetch=True)
    stores = [[layer.store for _, layer in hf_moe_opt.optimized_layers(stack)] for stack in stacks]
    d_model = stores[0][0].weights.w1.tensor.shape[2]
    inputs = _decode_like_inputs(d_model, 12, seed=5)
    with torch.no_grad():
        for i in range(0, len(inputs), 3):  # three steps of one model, then three of the other
            for h in inputs[i : i + 3]:
                stacks[(i // 3) % 2](h.to(DEVICE))
    for own in stores:
        assert [s._next() for s in own] == own[1:] + own[:1]
        assert own[0]._chain_of is own[-1]._chain_of
    assert stores[0][0]._chain_of is not stores[1][0]._chain_of


def test_prefetch_generate_identical_tokens():
    base = tiny_switch(num_experts=NUM_EXPERTS, sparse_step=1).to(DEVICE)
    resident, cached = copy.deepcopy(base), copy.deepcopy(base)
    hf_moe_opt.optimize(resident, capacity="none")
    _quiet_optimize(cached, expert_cache=2, cache_prefetch=True)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    kw = {"max_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(resident.generate(ids, **kw), cached.generate(ids, **kw))
    assert sum(v["prefetched"] for v in hf_moe_opt.stats(cached).values()) > 0


def test_router_on_cpu_while_cuda_present_warns_and_serves_the_cpu(monkeypatch):
    """A model run on the CPU on a GPU machine (the demo's default) still gets a working cache, with
    one warning that says how to serve the GPU instead; no warning where there is no GPU."""
    base = tiny_switch(num_experts=4, sparse_step=1)
    resident, cached, quiet = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    hf_moe_opt.optimize(resident, capacity="none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_moe_opt.optimize(cached, expert_cache=2, capacity="none")
    ours = [w for w in caught if "CUDA is available" in str(w.message)]
    assert len(ours) == 1 and "compute on the CPU" in str(ours[0].message) and "move_dense" in str(ours[0].message)
    assert all(st["device"] == "cpu" for st in hf_moe_opt.stats(cached).values())
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(resident.generate(ids, **kw), cached.generate(ids, **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_moe_opt.optimize(quiet, expert_cache=2)
    assert not [w for w in caught if "CUDA is available" in str(w.message)]


def test_cpu_cache_does_not_pin_and_a_failed_pin_warns(monkeypatch):
    """A cache serving the CPU keeps its host copy pageable, silently (page-locking only speeds up
    copies to a GPU); where pinning for a GPU fails, one warning says the copies will be slower."""
    model = tiny_switch(num_experts=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_moe_opt.optimize(model, expert_cache=2)
    assert not [w for w in caught if "pinned" in str(w.message)]
    assert not any(st["host_pinned"] for st in hf_moe_opt.stats(model).values())

    import hf_moe_opt.cache.setup as setup

    class Unpinnable(setup.CachedExpertStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pin_error = "the driver refused to lock more memory"

    monkeypatch.setattr(setup, "CachedExpertStore", Unpinnable)
    with pytest.warns(RuntimeWarning, match="pinned .*unavailable.*driver refused.*pageable"):
        hf_moe_opt.optimize(tiny_switch(num_experts=4), expert_cache=2)


def test_read_misses_warn_where_the_torch_backend_copies_them():
    """Only the Triton decode kernels read misses from host memory: with the torch backend read mode
    copies them, and optimize says so once; with the Triton backend (interpreted here) no warning."""
    with pytest.warns(RuntimeWarning, match='cache_misses="read" .*Triton decode kernels only.*4 layer'):
        hf_moe_opt.optimize(tiny_switch(num_experts=4), expert_cache=2, cache_misses="read", backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tiny_switch(num_experts=4).to(DEVICE)  # compiled Triton needs CUDA, the interpreter runs anywhere
        hf_moe_opt.optimize(model, expert_cache=2, cache_misses="read", backend="triton")
    assert not [w for w in caught if "Triton decode kernels only" in str(w.message)]


def test_stats_on_models_without_cache():
    model = tiny_switch(num_experts=4)
    with pytest.raises(ValueError, match="not optimized"):
        hf_moe_opt.stats(model)
    hf_moe_opt.optimize(model)
    assert all(st == {} for st in hf_moe_opt.stats(model).values())
    hf_moe_opt.reset_stats(model)


def test_from_pretrained_with_the_offload_device_map(family, tmp_path):
    """Recipe 1 as documented: a checkpoint loaded with ``offload_device_map`` (on a GPU accelerate
    keeps the experts in host memory behind hooks), then ``optimize`` takes them over."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    family["base"].save_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(tmp_path))
    dmap = offload_device_map(skeleton, 0 if DEVICE.type == "cuda" else "cpu")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, device_map=dmap).eval()
    if DEVICE.type == "cuda":  # experts offloaded: meta parameters behind accelerate's hooks
        assert any(p.device.type == "meta" for p in model.parameters())
    _quiet_optimize(model, expert_cache=3)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not offloading_hooks(model)  # from_pretrained leaves plain device hooks on the dense parts
    assert all(
        st["device"] == str(DEVICE if DEVICE.type == "cpu" else "cuda:0") for st in hf_moe_opt.stats(model).values()
    )
    outs = _run(model, family["batches"])
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], outs, strict=True))


def test_refused_offloaded_model_keeps_its_hooks():
    """An optimize(expert_cache=...) that is refused (float64 weights) must not have taken over
    accelerate's offload hooks first: the model stays loadable and runnable as it was."""
    from accelerate import cpu_offload

    model = tiny_switch(num_experts=NUM_EXPERTS).double()
    for name in [k for k, v in offload_device_map(model, "cpu").items() if k and v == "cpu"]:
        cpu_offload(model.get_submodule(name), execution_device="cpu")
    hooked = offloading_hooks(model)
    assert hooked
    with pytest.raises(ValueError, match="float64"):
        _quiet_optimize(model, expert_cache=3)
    assert offloading_hooks(model) == hooked and not hf_moe_opt.is_optimized(model)
    assert any(p.device.type == "meta" for p in model.parameters())


def test_accelerate_offloaded_experts_are_taken_over(family):
    """The device-map recipe: experts offloaded by accelerate hooks, then optimize(expert_cache=...)."""
    from accelerate import cpu_offload

    model = copy.deepcopy(family["base"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"GPU {visible} is not here"):
        offload_device_map(model, visible)  # one past the last GPU (GPU 0 on a CPU machine)
    with pytest.raises(ValueError, match=f"move_dense: GPU {visible} is not here"):
        hf_moe_opt.cache.move_dense(model, f"cuda:{visible}")  # nothing moved, no CUDA assertion
    dmap = offload_device_map(model, "cpu")
    expert_names = [k for k, v in dmap.items() if k and v == "cpu"]
    assert len(expert_names) == 4 and all(n.endswith(".experts") for n in expert_names)
    loaders = []
    for name in expert_names:
        module = model.get_submodule(name)
        cpu_offload(module, execution_device=DEVICE)
        loaders.append(module.expert_0._hf_hook.weights_map if hasattr(module.expert_0, "_hf_hook") else None)
    assert any(p.device.type == "meta" for p in model.parameters())
    _quiet_optimize(model, expert_cache=3)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    outs = _run(model, family["batches"])
    assert all(torch.equal(a, b) for a, b in zip(family["outs"], outs, strict=True))
    # accelerate's host-side map no longer references the experts: one copy of each weight.
    for wm in loaders:
        if wm is not None:
            assert len(list(wm.dataset.state_dict if hasattr(wm.dataset, "state_dict") else wm.dataset)) == 0


@pytest.mark.parametrize("family", ["mixtral", "switch"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_cached_model_stay_exact(family, how):
    # copy.deepcopy or torch.save/torch.load of a model with a warm cache: what the store derives from
    # tensor addresses (the slot map's numpy view, pinning) is rebuilt, so the copy starts cold and its
    # outputs equal the uncached model's step after step (a stale slot map read never-written slots).
    import io

    from .test_families import tiny_model

    base = (tiny_model("mixtral") if family == "mixtral" else tiny_switch(num_experts=NUM_EXPERTS)).eval().to(DEVICE)
    cached = _quiet_optimize(copy.deepcopy(base), expert_cache=3, cache_policy="lru")
    g = torch.Generator().manual_seed(5)
    steps = [torch.randint(3, VOCAB, (1, 1), generator=g).to(DEVICE) for _ in range(24)]
    kwargs = (
        (lambda ids: {"input_ids": ids})
        if family == "mixtral"
        else (lambda ids: {"input_ids": ids, "decoder_input_ids": ids})
    )
    with torch.no_grad():
        for ids in steps[:6]:
            cached(**kwargs(ids))  # warm: experts in slots, the policy's history
        if how == "deepcopy":
            twin = copy.deepcopy(cached)
        else:
            buffer = io.BytesIO()
            torch.save(cached, buffer)
            buffer.seek(0)
            twin = torch.load(buffer, weights_only=False)
        for ids in steps:
            want = base(**kwargs(ids)).logits
            for model in (twin, cached):
                torch.testing.assert_close(model(**kwargs(ids)).logits, want, rtol=1e-5, atol=1e-6)
    stores = [layer.store for _, layer in hf_moe_opt.optimized_layers(twin)]
    assert stores and all(s._table_np.ctypes.data == s._table_host.data_ptr() for s in stores)
    assert all(s.stats()["steps"] >= len(steps) for s in stores)


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_loading_into_the_expert_modules_refreshes_the_cache(family):
    # A load_state_dict straight into a layer's experts (or, per-expert modules, into one expert) writes
    # the weights as a model-level load does: the cached slots are taken again, so the outputs follow.
    from .test_families import tiny_model

    base = (tiny_model("mixtral") if family == "mixtral" else tiny_switch(num_experts=NUM_EXPERTS)).eval()
    new = copy.deepcopy(base)  # the same model with other weights
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cached = _quiet_optimize(copy.deepcopy(base), expert_cache=4, cache_policy="lru")
    ids = torch.tensor([[11]])  # one token, its experts warm in the slots, hit again after the load
    kwargs = {"input_ids": ids} if family == "mixtral" else {"input_ids": ids, "decoder_input_ids": ids}
    want = copy.deepcopy(base)
    with torch.no_grad():
        cached(**kwargs)  # warm slots hold the old experts
        for name, layer in hf_moe_opt.optimized_layers(cached):
            source = new.get_submodule(name).experts
            if family == "switch" and name.startswith("encoder.block.0."):  # one expert module only, here
                layer.experts.get_submodule("expert_1").load_state_dict(source.get_submodule("expert_1").state_dict())
                want.get_submodule(name).experts.get_submodule("expert_1").load_state_dict(
                    source.get_submodule("expert_1").state_dict()
                )
            else:
                layer.experts.load_state_dict(source.state_dict())
                want.get_submodule(name).experts.load_state_dict(source.state_dict())
        torch.testing.assert_close(cached(**kwargs).logits, want(**kwargs).logits, rtol=1e-5, atol=1e-6)
        # Loading through the model acts once per layer, not once per hooked module.
        calls = []
        for _, layer in hf_moe_opt.optimized_layers(cached):
            layer.store.weights_changed = lambda _calls=calls: _calls.append(1)
        cached.load_state_dict(base.state_dict())
        assert len(calls) == len(hf_moe_opt.optimized_layers(cached))
    # restore() takes the hooks off: the HF block's experts load as before, nothing is called.
    layers = [layer for _, layer in hf_moe_opt.optimized_layers(cached)]
    hf_moe_opt.restore(cached)
    for name, _ in hf_moe_opt.optimized_layers(_quiet_optimize(copy.deepcopy(base))):
        cached.get_submodule(name).experts.load_state_dict(new.get_submodule(name).experts.state_dict())
    assert len(calls) == len(layers)


@pytest.mark.parametrize("slots", [6, 3, 1])
def test_input_gradients_through_the_cache_equal_the_resident_layers(slots):
    """With gradients on, a step needing more experts than there are slots loads into slots the step
    already computed with: autograd's saved weights must not be those slots (backward would refuse)."""
    import warnings

    from .test_families import tiny_model

    base = tiny_model("mixtral")  # top-2 of 6 experts
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))

    def input_grad(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no gradients for expert weights"
            model(inputs_embeds=emb).logits.square().sum().backward()
        return emb.grad

    want = input_grad(hf_moe_opt.optimize(copy.deepcopy(base), backend="torch"))
    model = copy.deepcopy(base)
    _quiet_optimize(model, backend="torch", expert_cache=slots)
    torch.testing.assert_close(input_grad(model), want, rtol=0, atol=0)
    if slots == 1:
        assert any(st["chunked_steps"] > 0 for st in hf_moe_opt.stats(model).values())


def test_fused_experts_re_pointed_are_followed():
    """Fused expert tensors (one parameter for all experts) given new data (``p.data = ...``, as
    accelerate does) are read afresh: the slots filled from the old data are emptied, as the
    per-expert families' are."""
    from .test_families import tiny_model

    base = tiny_model("mixtral")
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 8, "do_sample": False}
    plain = hf_moe_opt.optimize(copy.deepcopy(base), backend="torch")
    model = copy.deepcopy(base)
    _quiet_optimize(model, backend="torch", expert_cache=2)
    with torch.no_grad():
        model.generate(ids, **kw)  # the slots hold experts now
        for m in (plain, model):
            for name, p in m.named_parameters():
                if ".experts." in name:
                    p.data = p.data.clone() * 0.5
        assert torch.equal(model.generate(ids, **kw), plain.generate(ids, **kw))
        out = model(ids).logits
        torch.testing.assert_close(out, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_prefetching_model_keep_their_own_chain(how):
    """Each optimized model has its own look-ahead chain, so that its last layer never prefetches into
    another model's first; copies of it get one each as well (not the process-wide chain)."""
    from .models import copied
    from .test_families import tiny_model

    base = tiny_model("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 64, (1, 1), generator=torch.Generator().manual_seed(2))
    model = copy.deepcopy(base)
    _quiet_optimize(model, backend="torch", expert_cache=1, cache_prefetch=True)

    copies = [copied(model, how), copied(model, how)]
    with torch.no_grad():
        for _ in range(3):  # decode-sized calls of the two copies, one after the other
            for m in copies:
                m(input_ids=ids)
    for m in copies:
        stores = [layer.store for _, layer in hf_moe_opt.optimized_layers(m)]
        assert len({id(s._chain_of) for s in stores}) == 1
        last = stores[-1]
        assert last._next is not None and last._next() is stores[0]  # its own first layer, not the other's


def test_a_fraction_below_the_pinned_experts_says_what_it_gives():
    model = tiny_switch(num_experts=6)
    with pytest.warns(UserWarning, match="fewer than its 5 pinned experts.*gets 6.*nothing is cached"):
        _quiet_optimize(model, expert_cache=0.5, pinned_experts=[0, 1, 2, 3, 4])
    assert all(st["num_slots"] == 6 for st in hf_moe_opt.stats(model).values())
