"""Routing pieces: padding extraction, sampled second-expert policies, and transformers' own blocks."""

import pytest
import torch
import transformers
from packaging.version import Version

from hf_moe_opt.routing import nllb_route, token_padding_mask

from .models import tiny_nllb, tiny_switch
from .reference import nllb_reference, switch_reference

TF = Version(transformers.__version__)


def _keep_2d(batch=2, seq=5):
    keep = torch.ones(batch, seq, dtype=torch.long)
    keep[0, 3:] = 0
    keep[1, 0] = 0  # left padding
    return keep


def test_padding_from_2d_mask():
    keep = _keep_2d()
    assert torch.equal(token_padding_mask(keep, 2, 5), (keep == 0).reshape(-1))
    assert token_padding_mask(None, 2, 5) is None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padding_from_4d_masks(causal, kind):
    keep = _keep_2d().bool()
    b, s = keep.shape
    allowed = keep[:, None, None, :].expand(b, 1, s, s).clone()
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    mask = (
        allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    )
    assert torch.equal(token_padding_mask(mask, b, s), (~keep).reshape(-1))


def test_padding_with_kv_cache_reads_the_current_positions():
    # One new token per sequence; keys hold 4 past positions plus the new one.
    keep = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.zeros(2, 1, 1, 5).masked_fill(~keep[:, None, None, :], -1e9)
    assert torch.equal(token_padding_mask(mask, 2, 1), torch.tensor([False, False]))


def test_padding_rejects_a_mask_that_does_not_fit():
    with pytest.raises(ValueError, match="does not cover"):
        token_padding_mask(torch.ones(3, 4), 2, 4)


def test_random_policy_keeps_second_expert_with_probability_twice_its_gate():
    torch.manual_seed(0)
    logits = torch.randn(20000, 8) * 1.5
    r = nllb_route(logits, torch.float32, capacity=None, second_expert_policy="random")
    p2 = torch.softmax(logits, -1).gather(1, r.expert_index[:, 1:]).squeeze(1)
    expected = torch.clamp(2 * p2, max=1.0).mean()
    observed = r.keep[:, 1].float().mean()
    assert abs(observed - expected) < 0.015
    assert r.keep[:, 0].all()
    # Dropping the second expert gives the first the whole gate.
    dropped = ~r.keep[:, 1]
    torch.testing.assert_close(r.gates[dropped, 0], torch.ones(int(dropped.sum())))


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize("capacity", [None, 5])
def test_random_policy_matches_transformers_router(normalize_before, capacity):
    """Same random stream, same choices and gates as transformers' NLLB-MoE router (whose random policy
    reads the raw second probability back: under normalize_before it is the second gate, unrenormalised)."""
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

    config = NllbMoeConfig(
        d_model=16,
        num_experts=4,
        second_expert_policy="random",
        normalize_router_prob_before_dropping=normalize_before,
        moe_eval_capacity_token_fraction=-1.0 if capacity else 1.0,
    )
    router = NllbMoeTop2Router(config).eval()
    router.expert_capacity = capacity
    logits = torch.randn(64, 4) * 1.5
    torch.manual_seed(1)
    _, expected = router.route_tokens(logits.clone(), torch.float32)
    torch.manual_seed(1)
    r = nllb_route(logits, torch.float32, capacity=capacity or 64, second_expert_policy="random",
                   normalize_before=normalize_before)  # fmt: skip
    got = torch.zeros_like(expected).scatter_add_(1, r.expert_index, r.gates)
    assert not r.keep[:, 1].all()  # the draw dropped some second experts
    torch.testing.assert_close(got, expected)


def test_sampling_policy_draws_second_expert_from_softmax_without_first():
    torch.manual_seed(0)
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    logits = row.repeat(40000, 1)
    r = nllb_route(logits, torch.float32, capacity=None, second_expert_policy="sampling")
    assert (r.expert_index[:, 0] == 0).all()
    freq = torch.bincount(r.expert_index[:, 1], minlength=5).float() / logits.shape[0]
    expected = torch.softmax(row[1:], 0)
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], expected, atol=0.01, rtol=0)


def test_unknown_second_expert_policy():
    with pytest.raises(ValueError, match="second_expert_policy"):
        nllb_route(torch.randn(3, 4), torch.float32, capacity=None, second_expert_policy="best")


def _nllb_block_vs_reference():
    model = tiny_nllb(num_experts=8, moe_token_dropout=0.0)
    block = model.model.encoder.layers[0].ffn
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = nllb_reference(block, x, None, capacity=None, token_dropout=0.0)
        got = block(x)
    return torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_transformers_nllb_block_against_reference():
    """transformers 5.0-5.25 one-hot an already one-hot mask: only experts 0 and 1 run (DESIGN.md)."""
    close = _nllb_block_vs_reference()
    known_broken = Version("5.0") <= TF < Version("5.26")
    if known_broken:
        assert not close, f"transformers {TF}'s NLLB-MoE block now matches the reference: update this test"
    elif not close:
        pytest.xfail(f"transformers {TF}'s NLLB-MoE block deviates from the reference semantics")


def test_transformers_switch_block_against_reference():
    """Capacity is per sequence; transformers 5.0-5.17 never applies it (cumsum over a size-1 dim)."""
    model = tiny_switch(num_experts=2, expert_capacity=1)
    block = model.encoder.block[0].layer[1].mlp
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = switch_reference(block, x, capacity=1)
        got = block(x)
    close = torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if Version("5.0") <= TF < Version("5.18"):
        assert not close, f"transformers {TF} now applies Switch capacity: update this test"
    elif Version("5.18") <= TF < Version("5.23") and not close:
        pytest.xfail(f"transformers {TF} does not apply Switch expert capacity")
    else:
        assert close


@pytest.mark.parametrize(
    "routing",
    [
        dict(),
        dict(moe_eval_capacity_token_fraction=0.3),
        dict(expert_capacity=2, moe_eval_capacity_token_fraction=-1.0),
    ],
)
def test_eager_nllb_baseline_is_correct_and_matches_optimized(routing):
    import copy

    import hf_moe_opt
    from hf_moe_opt.baselines import remove_nllb_eager_reference, use_nllb_eager_reference

    from .models import VOCAB, use_reference_blocks

    model = tiny_nllb(num_experts=8, **routing)
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = copy.deepcopy(model)
    use_reference_blocks(ref, "model", {"encoder": mask == 0})
    base = copy.deepcopy(model)
    assert use_nllb_eager_reference(base) == 4
    hf_moe_opt.optimize(model)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
        got_base = base(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
        got_opt = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(got_base, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_opt, want, atol=2e-5, rtol=2e-5)
    assert remove_nllb_eager_reference(base) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_reference_applies_capacity_per_sequence(dtype):
    """The Switch reference block equals the optimized layer with capacity="model" (the rule of
    docs/semantics.md) on every transformers version, and the HF block where that applies capacity."""
    import copy

    import hf_moe_opt
    from hf_moe_opt.baselines import SwitchEagerReference, remove_switch_eager_reference, use_switch_eager_reference
    from hf_moe_opt.evaluation.common import transformers_switch_applies_capacity

    model = tiny_switch(num_experts=4, expert_capacity=3).to(dtype)
    ids = torch.randint(3, 60, (3, 12))
    ref = copy.deepcopy(model)
    assert use_switch_eager_reference(ref) == sum(isinstance(m, SwitchEagerReference) for m in ref.modules()) > 0
    optimized = copy.deepcopy(model)
    hf_moe_opt.optimize(optimized, capacity="model", backend="torch")
    with torch.no_grad():
        x = torch.randn(3, 12, model.config.d_model, dtype=dtype)
        block = next(m for m in ref.modules() if isinstance(m, SwitchEagerReference))
        dropped = (block(x) == 0).all(-1).sum().item()
        want = optimized(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        got = ref(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        hf = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert dropped > 0  # capacity 3 of 12 tokens over 4 experts binds
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got, want, **tol)
    if transformers_switch_applies_capacity():
        assert torch.equal(got, hf)
    else:
        assert not torch.allclose(got, hf, **tol)  # the installed block drops nothing
    assert remove_switch_eager_reference(ref) > 0
    assert not any(isinstance(m, SwitchEagerReference) for m in ref.modules())


def test_hf_reference_swaps_nllb_blocks_for_the_block_only():
    from hf_moe_opt.baselines import NllbMoeEagerReference, hf_reference

    def references(m):
        return sum(isinstance(x, NllbMoeEagerReference) for x in m.modules())

    model = tiny_nllb(num_experts=8)
    with hf_reference(model) as inside:
        assert inside is model and references(model) == 4
    assert references(model) == 0
    with pytest.raises(RuntimeError), hf_reference(model):
        raise RuntimeError("a failed timing still puts the blocks back")
    assert references(model) == 0
    switch = tiny_switch()
    before = [type(m) for m in switch.modules()]
    with hf_reference(switch):
        assert [type(m) for m in switch.modules()] == before  # other models run as loaded


def test_router_logits_cast_copy_follows_weight_updates() -> None:
    """Without gradients the float32 copy is kept and follows the weight; an in-place write goes into
    the same copy (graphs captured on it read the new values once refreshed, without a router call)."""
    from torch import nn

    from hf_moe_opt.routing import router_logits
    from hf_moe_opt.routing.types import refresh_router_cast

    classifier = nn.Linear(8, 4, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)

    def expected() -> torch.Tensor:
        return nn.functional.linear(x.float(), classifier.weight.float(), classifier.bias.float())

    def kept() -> torch.Tensor:
        return classifier.__dict__["_hf_moe_opt_router_cast"][1][0]

    with torch.no_grad():
        torch.testing.assert_close(router_logits(x, classifier, torch.float32), expected(), rtol=0, atol=0)
        copy_ptr = kept().data_ptr()
        classifier.weight.mul_(-2)  # in place: same storage, new version
        refresh_router_cast(classifier)
        assert kept().data_ptr() == copy_ptr and torch.equal(kept(), classifier.weight.float())
        classifier.weight.mul_(3)
        torch.testing.assert_close(router_logits(x, classifier, torch.float32), expected(), rtol=0, atol=0)
        assert kept().data_ptr() == copy_ptr
        classifier.bias = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))  # new storage
        torch.testing.assert_close(router_logits(x, classifier, torch.float32), expected(), rtol=0, atol=0)
    assert classifier.weight.dtype == torch.bfloat16  # the module is not cast in place


def test_router_logits_with_inference_tensors_and_autograd() -> None:
    """Weights made under inference_mode (no version counter) are cast per call; a copy kept during an
    inference_mode call serves a later call with autograd on; with autograd on the router's own weight
    gets its gradient through the cast."""
    from torch import nn

    from hf_moe_opt.routing import router_logits

    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        frozen = nn.Linear(8, 4).to(torch.bfloat16)
    want = nn.functional.linear(x.float(), frozen.weight.float(), frozen.bias.float())
    with torch.no_grad():
        torch.testing.assert_close(router_logits(x, frozen, torch.float32), want, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(router_logits(x, frozen, torch.float32), want, rtol=0, atol=0)

    classifier = nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)
    with torch.inference_mode():
        router_logits(x, classifier, torch.float32)  # keeps a copy
    xg = x.clone().requires_grad_(True)
    router_logits(xg, classifier, torch.float32).sum().backward()  # saves the kept copy for backward
    torch.testing.assert_close(xg.grad, classifier.weight.float().sum(0).expand(3, 8).to(xg.dtype))

    classifier.requires_grad_(True)
    router_logits(x, classifier, torch.float32).pow(2).sum().backward()
    logits = nn.functional.linear(x.float(), classifier.weight.float(), classifier.bias.float())
    want_grad = (2 * logits).t() @ x.float()
    assert classifier.weight.grad is not None and classifier.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(classifier.weight.grad.float(), want_grad, rtol=2e-2, atol=2e-2)


def _switch_keep_reference(expert: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Plain loop: the c-th token (in sequence order) of a sequence routed to an expert is kept while
    c <= capacity; ``expert`` is ``[B, S]``."""
    keep = torch.ones_like(expert, dtype=torch.bool)
    for b in range(expert.shape[0]):
        used: dict[int, int] = {}
        for s in range(expert.shape[1]):
            e = int(expert[b, s])
            used[e] = used.get(e, 0) + 1
            keep[b, s] = capacity is None or used[e] <= capacity
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_switch_route_capacity_at_every_boundary(seed):
    """Random skewed routing over sequence lengths around the capacity (seq = capacity, capacity + 1,
    ...): the kept assignments are exactly the first ``capacity`` of each (sequence, expert)."""
    from hf_moe_opt.routing.switch import switch_route

    g = torch.Generator().manual_seed(seed)
    num_experts = 4
    for capacity in (1, 2, 3, 5):
        for seq in (capacity, capacity + 1, capacity + 2, 3 * capacity + 1):
            batch = int(torch.randint(1, 4, (1,), generator=g))
            skew = torch.tensor([2.0, 0.0, 0.0, -1.0])  # expert 0 is popular: its queue overflows
            logits = torch.randn(batch, seq, num_experts, generator=g) + skew
            routing = switch_route(logits, torch.float32, capacity)
            expert = routing.expert_index.view(batch, seq)
            assert torch.equal(expert, logits.argmax(-1))
            want = _switch_keep_reference(expert, capacity)
            got = torch.ones_like(want) if routing.keep is None else routing.keep.view(batch, seq)
            assert torch.equal(got, want), (capacity, seq, batch)


def test_switch_choice_ties_in_the_input_dtype_go_to_the_lower_expert():
    """transformers takes the argmax of the probabilities cast to the input dtype: two probabilities
    that differ in float32 but round to one bfloat16 value tie, and the lower expert wins."""
    from hf_moe_opt.routing.switch import switch_choice

    logits = torch.tensor([[0.0, 1e-3, -6.0, -6.0]])
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, 1] > probs[0, 0]  # float32 would choose expert 1
    assert probs.bfloat16()[0, 0] == probs.bfloat16()[0, 1]  # bf16 ties them
    expert, gate = switch_choice(logits, torch.bfloat16)
    assert int(expert) == 0 and gate.dtype == torch.bfloat16 and gate.item() == probs.bfloat16()[0, 0].item()
    expert, _ = switch_choice(logits, torch.float32)
    assert int(expert) == 1


def test_nllb_capacity_rules_worked_by_hand():
    """Eval-mode capacity: a positive token fraction wins (ceil), else the configured capacity, else
    transformers' default of twice the even share (reachable only where the config allows None)."""
    from types import SimpleNamespace

    from patches.nllb_moe import nllb_capacity

    def router(fraction, configured):
        return SimpleNamespace(moe_eval_capacity_token_fraction=fraction, _hf_moe_opt_config_capacity=configured)

    assert nllb_capacity(router(0.3, 5), 11, 4) == 4  # ceil(3.3)
    assert nllb_capacity(router(1.0, None), 11, 4) == 11
    assert nllb_capacity(router(0.0, 5), 11, 4) == 5
    assert nllb_capacity(router(-1.0, None), 11, 4) == 6  # 2 * ceil(11 / 4)
    assert nllb_capacity(router(0.0, None), 16, 4) == 8  # 2 * ceil(16 / 4)
