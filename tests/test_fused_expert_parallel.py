"""Expert parallelism over 2 gloo ranks for fused-expert families, fp32 and bf16.

Each rank keeps only its experts: the fused parameters shrink in place to the rank's slices (no
second copy). Outputs must match the single-process optimized model on each rank's own batch.
"""

from __future__ import annotations

import copy
import traceback

import torch
import torch.distributed as dist
import transformers

import hf_moe_opt
from hf_moe_opt.placement import plan_placement, profile

from .test_expert_parallel import _init, _run
from .test_families import BF16, tiny_model

CASES = [("qwen2_moe", "fp32", "replicate"), ("gpt_oss", "bf16", "greedy"), ("deepseek_v3", "fp32", "round_robin")]
if hasattr(transformers, "DeepseekV4Config"):  # hash routing by token id on every rank's own batch
    CASES.append(("deepseek_v4", "fp32", "greedy"))
if hasattr(transformers, "ZayaConfig"):  # a router state carried across layers, top-1
    CASES.append(("zaya", "bf16", "round_robin"))
if hasattr(transformers, "JetMoeConfig"):  # experts in two modules of the block, an output bias
    CASES.append(("jetmoe", "fp32", "replicate"))


def _ids(seed: int, batch: int, seq: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, seq), generator=g)


def _fused(layer) -> dict[str, torch.Tensor]:
    """The layer's fused expert parameters by state-dict key under the layer (JetMoE's are not under
    an ``experts`` module)."""
    prefix = "" if layer.family == "jetmoe" else "experts."
    names = ("gate_up_proj", "down_proj", "input_linear.weight", "output_linear.weight")
    return {prefix + n: p for n, p in layer.experts.named_parameters() if n.startswith(names)}


def _check_case(rank: int, world: int, family: str, dtype_name: str, strategy: str) -> None:
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    model = tiny_model(family, seed=0).to(dtype)
    # The same profiling batches on every rank give the same plan.
    trace = profile(model, [{"input_ids": _ids(100 + i, 4)} for i in range(4)], progress=False)
    plan = plan_placement(trace, world, strategy, 1 if strategy == "replicate" else 0)
    ids = _ids(1000 + rank, batch=1 + rank)  # a different batch (and size) per rank
    reference = hf_moe_opt.optimize(copy.deepcopy(model), backend="torch")
    originals = {
        name: {k: v.detach().clone() for k, v in _fused(layer).items()}
        for name, layer in (hf_moe_opt.optimized_layers(reference))
    }
    with torch.no_grad():
        want = reference(ids).logits
    hf_moe_opt.optimize(model, backend="torch", expert_parallel=True, placement=plan)
    with torch.no_grad():
        got = model(ids).logits
        again = model(ids).logits
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), **BF16)
    assert torch.equal(got, again), "expert-parallel output is not deterministic"
    state = model.state_dict()
    for name, layer in hf_moe_opt.optimized_layers(model):
        mine = plan.experts_on(name, rank)
        assert layer.num_experts == trace.num_experts  # routing still sees every expert
        assert len(_fused(layer)) >= 2  # GPT-OSS: and the biases
        for key, p in _fused(layer).items():
            # The parameter is shrunk to this rank's experts, in plan order: the others are freed.
            assert p.shape[0] == len(mine), (name, key)
            assert torch.equal(p, originals[name][key][mine]), (name, key)
            assert state[f"{name}.{key}"].data_ptr() == p.data_ptr()
        assert layer.store.stats()["calls"] == 2
    try:
        hf_moe_opt.restore(model)
    except ValueError as exc:
        assert "cannot be restored" in str(exc)
    else:
        raise AssertionError("restore must refuse an expert-parallel model")


def _worker(rank: int, world: int, port: int, errors) -> None:
    try:
        _init(rank, world, port)
        for case in CASES:
            _check_case(rank, world, *case)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent, which fails the test
        errors.put((rank, traceback.format_exc()))
        raise


def test_fused_two_ranks_match_single_process():
    errors = _run(2, _worker)
    assert not errors, "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)
