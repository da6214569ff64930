"""Expert parallelism over gloo on CPU: 2 and 4 processes give the single-process optimized output.

Every process builds the same tiny model from the same seed, feeds its own batch, and compares the
expert-parallel output with the single-process optimized model on that batch. Mismatched ranks
and dead ranks must end in a clear error, not a hang.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_moe_opt
from hf_moe_opt.experts.activation import Activation
from hf_moe_opt.experts.store import ResidentStore
from hf_moe_opt.experts.torch_backend import torch_moe_ffn
from hf_moe_opt.placement import PlacementPlan, plan_placement, profile
from hf_moe_opt.placement.expert_parallel import ExpertParallelStore
from hf_moe_opt.placement.store import ReplicaTable

from .models import VOCAB, integer_expert_weights, random_routing, tiny_nllb, tiny_switch

TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, timeout_s: float = TIMEOUT_S) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _batch(seed: int, batch: int = 2, src: int = 7, tgt: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, VOCAB, (batch, src), generator=g),
        "decoder_input_ids": torch.randint(2, VOCAB, (batch, tgt), generator=g),
    }


def _plan(model, world: int, strategy: str):
    # The same batches on every rank give the same trace, hence the same plan.
    trace = profile(model, [_batch(100 + i, 4) for i in range(4)], progress=False)
    return plan_placement(trace, world, strategy, 1 if strategy == "replicate" else 0)


def _check_case(rank: int, world: int, make, num_experts: int, strategy: str) -> None:
    model = make(num_experts=num_experts, seed=0)
    plan = _plan(model, world, strategy)
    batch = _batch(1000 + rank, batch=1 + rank % 2)  # different batch sizes per rank
    reference = hf_moe_opt.optimize(copy.deepcopy(model))
    with torch.no_grad():
        want = reference(**batch).logits
    hf_moe_opt.optimize(model, expert_parallel=True, placement=plan)
    with torch.no_grad():
        got = model(**batch).logits
        got_again = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, got_again), "expert-parallel output is not deterministic"
    # Each rank keeps only its experts: state_dict and parameter memory shrink accordingly.
    for name, layer in hf_moe_opt.optimized_layers(model):
        mine = set(plan.experts_on(name, rank))
        held = {int(n.split("_")[1]) for n, _ in layer.experts.named_children() if n.startswith("expert_")}
        assert held == mine, (name, held, mine)
        keys = [k for k in model.state_dict() if k.startswith(f"{name}.experts.")]
        assert {int(k.split(".experts.expert_")[1].split(".")[0]) for k in keys} == mine
        assert layer.store.stats()["calls"] == 2
    with pytest.raises(ValueError, match="cannot be restored"):
        hf_moe_opt.restore(model)


def _zero_token_case(rank: int, world: int) -> None:
    model = tiny_switch(num_experts=4, seed=0, expert_capacity=64)
    plan = _plan(model, world, "greedy")
    layer_ref = copy.deepcopy(model)
    hf_moe_opt.optimize(layer_ref)
    hf_moe_opt.optimize(model, expert_parallel=True, placement=plan)
    name, layer = hf_moe_opt.optimized_layers(model)[0]
    ref = dict(hf_moe_opt.optimized_layers(layer_ref))[name]
    g = torch.Generator().manual_seed(rank)
    # Rank 0 sends no tokens at all; the others still exchange with it.
    tokens = 0 if rank == 0 else 6
    hidden = torch.randn(1, tokens, model.config.d_model, generator=g)
    with torch.no_grad():
        got = layer(hidden)
        want = ref(hidden)
    assert got.shape == (1, tokens, model.config.d_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _store_case(rank: int, world: int) -> None:
    # Dropped assignments, top-k > 1 and a rank without tokens through the exchange, unsort and slot
    # sum: integer rows and weights make every GEMM exact, so the output matches the single-device
    # store bit for bit (replicas included).
    num_experts, hidden, ffn = 6, 16, 24
    act = Activation("relu", torch.relu)
    spread = [[(e % world, 1.0)] for e in range(num_experts)]
    replicated = [[((e + i) % world, 1.0 / world) for i in range(world)] for e in range(num_experts)]
    resident = ResidentStore(integer_expert_weights(num_experts, hidden, ffn))
    # The last rank holds no experts, and bf16 rows meet fp32 experts: every rank must still size its
    # buffers in the experts' dtype.
    one_rank = [[(0, 1.0)] for _ in range(num_experts)]
    for layer, dtype in ((spread, torch.float32), (replicated, torch.float32), (one_rank, torch.bfloat16)):
        plan = PlacementPlan(num_devices=world, strategy="hand", layers={"l": layer})
        weights = integer_expert_weights(num_experts, hidden, ffn)
        store = ExpertParallelStore(weights, ReplicaTable(plan, "l", num_experts), None, "l")
        for top_k in (1, 2, 3):
            for seed, (tokens, drop) in enumerate([(0, 0.0), (19, 0.0), (19, 0.4), (7, 1.0)]):
                tokens = tokens + 3 * rank if tokens else (0 if rank == 0 else 5)  # rank 0: no tokens
                x, dispatch = random_routing(100 * rank + seed, tokens, top_k, hidden, num_experts, drop)
                x = x.to(dtype)
                for scale in (1.0, 0.5):
                    got = store.run(x, dispatch, lambda d, n: torch_moe_ffn, act, scale)
                    if tokens == 0:
                        assert got.shape == (0, hidden), got.shape
                        continue
                    want = resident.run(x, dispatch, lambda d, n: torch_moe_ffn, act, scale)
                    assert torch.equal(got, want), (top_k, seed, scale)


def _cast_case(rank: int, world: int) -> None:
    # Rank 0 holds every expert, the others none: after model.to(bf16) every rank must still send its
    # rows in the experts' new dtype (a rank without experts has no expert parameter that is cast).
    model = tiny_switch(num_experts=4, seed=0, expert_capacity=64)
    names = [name for name, _ in hf_moe_opt.optimized_layers(hf_moe_opt.optimize(copy.deepcopy(model)))]
    # Plans that differ only in metadata place the same: the ranks agree.
    layers = {n: [[(0, 1.0)]] * 4 for n in names}
    plan = PlacementPlan(num_devices=world, strategy="hand", layers=layers, metadata={"made_on_rank": rank})
    reference = hf_moe_opt.optimize(copy.deepcopy(model)).to(torch.bfloat16)
    hf_moe_opt.optimize(model, expert_parallel=True, placement=plan)
    assert "_hf_moe_opt_expert_dtype" not in "".join(model.state_dict())
    model.to(torch.bfloat16)
    batch = _batch(200 + rank)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    # Expert parameters re-pointed one by one (p.data = ...), then sync_expert_copies: on both models.
    for m in (model, reference):
        for name, p in m.named_parameters():
            if ".experts.expert_" in name:
                p.data = p.data * 1.5
        hf_moe_opt.sync_expert_copies(m)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def _worker(rank: int, world: int, port: int, cases: list, errors) -> None:
    try:
        _init(rank, world, port)
        for case in cases:
            if case == "zero":
                _zero_token_case(rank, world)
            elif case == "store":
                _store_case(rank, world)
            elif case == "cast":
                _cast_case(rank, world)
            else:
                family, num_experts, strategy = case
                make = tiny_switch if family == "switch" else tiny_nllb
                _check_case(rank, world, make, num_experts, strategy)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent, which fails the test
        errors.put((rank, traceback.format_exc()))
        raise


def _context():
    # A fork server that imported torch, transformers and this module once: every rank starts in
    # well under a second instead of importing everything again (and nothing forks a process that
    # already ran OpenMP threads).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _run(world: int, target, *args) -> list:
    ctx = _context()
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not alive, f"ranks hung: {[procs.index(p) for p in alive]}; errors: {found}"
    return found


def test_two_ranks_match_single_process():
    errors = _run(2, _worker, [("switch", 4, "replicate"), ("nllb", 4, "greedy"), "zero", "store"])
    assert not errors, "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)


def test_rank_without_experts_follows_dtype_cast():
    errors = _run(2, _worker, ["cast"])
    assert not errors, "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)


def test_four_ranks_match_single_process():
    errors = _run(4, _worker, [("nllb", 8, "replicate"), ("switch", 4, "round_robin"), "store"])
    assert not errors, "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)


def test_eight_ranks_match_single_process():
    # The world size of one 8-GPU host: one expert per rank, two per rank, replicas across ranks.
    errors = _run(8, _worker, [("switch", 8, "greedy"), ("nllb", 16, "replicate")])
    assert not errors, "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)


def _mismatch_worker(rank: int, world: int, port: int, errors) -> None:
    _init(rank, world, port)
    model = tiny_switch(num_experts=8 if rank == 1 else 4, seed=0)
    start = time.monotonic()
    try:
        hf_moe_opt.optimize(model, expert_parallel=True)
    except ValueError as exc:
        took = time.monotonic() - start
        errors.put((rank, f"ValueError after {took:.1f}s: {exc}"))
        assert not hf_moe_opt.is_optimized(model), "a failed optimize must leave the model as it was"
        return
    errors.put((rank, "no error"))


def test_mismatched_rank_raises_clear_error_on_every_rank():
    results = sorted(_run(2, _mismatch_worker))
    assert [r for r, _ in results] == [0, 1], results
    for _, message in results:
        assert message.startswith("ValueError"), message
        assert "same model and placement plan on every rank" in message
        assert float(message.split("after ")[1].split("s:")[0]) < TIMEOUT_S


def _dead_rank_worker(rank: int, world: int, port: int, errors) -> None:
    _init(rank, world, port, timeout_s=10)
    model = tiny_switch(num_experts=4, seed=0)
    hf_moe_opt.optimize(model, expert_parallel=True)
    if rank == 1:
        os._exit(0)  # dies without taking part in the forward
    start = time.monotonic()
    try:
        with torch.no_grad():
            model(**_batch(0))
    except RuntimeError as exc:
        errors.put((rank, f"RuntimeError after {time.monotonic() - start:.1f}s: {exc}"))
        return
    errors.put((rank, "no error"))


def _out_of_step_worker(rank: int, world: int, port: int, errors) -> None:
    """Rank 1 runs its encoder once more than rank 0 before both run the full model: the collectives
    would pair rank 0's decoder layers with rank 1's encoder layers, the same number of calls in all."""
    _init(rank, world, port, timeout_s=20)
    model = tiny_switch(num_experts=4, seed=0)
    hf_moe_opt.optimize(model, expert_parallel=True)
    batch = _batch(0)
    try:
        with torch.no_grad():
            if rank == 1:
                model.get_encoder()(input_ids=batch["input_ids"])
            model(**batch)
            if rank == 0:
                model.get_encoder()(input_ids=batch["input_ids"])
    except RuntimeError as exc:
        errors.put((rank, f"RuntimeError: {exc}"))
        return
    errors.put((rank, "no error"))


def test_ranks_out_of_step_raise_instead_of_mixing_layers():
    results = sorted(_run(2, _out_of_step_worker))
    assert [r for r, _ in results] == [0, 1], results
    for _, message in results:
        assert message.startswith("RuntimeError") and "out of step" in message, message


def test_dead_rank_raises_instead_of_hanging():
    results = _run(2, _dead_rank_worker)
    assert len(results) == 1 and results[0][0] == 0, results
    message = results[0][1]
    assert message.startswith("RuntimeError"), message
    assert "expert-parallel all-to-all" in message and "peer rank died" in message


def _call_number_worker(rank: int, world: int, port: int, errors) -> None:
    """Every expert on rank 0, 5 tokens top-1 on each rank; one call, then rank 1's call counter is
    moved one ahead and both call the same layer again."""
    _init(rank, world, port)
    num_experts, hidden = 4, 8
    plan = PlacementPlan(num_devices=world, strategy="hand", layers={"l": [[(0, 1.0)]] * num_experts})
    store = ExpertParallelStore(
        integer_expert_weights(num_experts, hidden, 12), ReplicaTable(plan, "l", num_experts), None, "l"
    )
    act = Activation("relu", torch.relu)
    x, dispatch = random_routing(rank, 5, 1, hidden, num_experts, 0.0)
    store.run(x, dispatch, lambda d, n: torch_moe_ffn, act, 1.0)
    result = {"stats": store.stats()}
    if rank == 1:
        store.calls += 1  # same layer, but one call ahead
    try:
        store.run(x, dispatch, lambda d, n: torch_moe_ffn, act, 1.0)
        result["again"] = "no error"
    except RuntimeError as exc:
        result["again"] = f"RuntimeError: {exc}"
    errors.put((rank, result))
    dist.destroy_process_group()


def test_rows_computed_and_call_numbers_checked_per_rank():
    """``stats()`` counts the rows each rank sent and the rows its experts computed: with every expert
    on rank 0 and 5 single-expert tokens per rank, rank 0 computes 5 + 5 = 10 rows and rank 1 none,
    while each sends its 5. The out-of-step check compares the call number as well as the layer: a rank
    one call ahead in the same layer raises "out of step" on both ranks instead of pairing calls."""
    results = sorted(_run(2, _call_number_worker), key=lambda r: r[0])
    assert [r for r, _ in results] == [0, 1], results
    (_, first), (_, second) = results
    assert first["stats"] == {"calls": 1, "rows_sent": 5, "rows_computed": 10}, first
    assert second["stats"] == {"calls": 1, "rows_sent": 5, "rows_computed": 0}, second
    for _, result in results:
        assert result["again"].startswith("RuntimeError") and "out of step" in result["again"], result
    assert "(call 1) while rank 1 is in 'l' (call 2)" in first["again"], first
