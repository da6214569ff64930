"""The routing profiler: counts equal a manual count of the routing, and traces round-trip to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_moe_opt
from hf_moe_opt.placement import RoutingTrace, plan_placement, profile, routing_statistics

from .models import VOCAB, tiny_nllb, tiny_switch


def _batches(n: int, seed: int = 0, batch: int = 3, src: int = 9, tgt: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(2, VOCAB, (batch, src), generator=g),
            "decoder_input_ids": torch.randint(2, VOCAB, (batch, tgt), generator=g),
        }
        for _ in range(n)
    ]


def _manual_trace(model, batches) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Record every routing with a separate observer and count it with routing_statistics."""
    seen: dict[str, list] = {}
    layers = hf_moe_opt.optimized_layers(model)
    names = {id(layer): name for name, layer in layers}
    current: dict[str, list] = {}

    def observe(layer, routing):
        current.setdefault(names[id(layer)], []).append((routing.expert_index.clone(), routing.keep))

    for _, layer in layers:
        layer.observers.append(observe)
    try:
        with torch.no_grad():
            for b in batches:
                current.clear()
                model(**b)
                for name, layer in layers:
                    total_c = np.zeros(layer.num_experts, dtype=np.int64)
                    total_co = np.zeros((layer.num_experts, layer.num_experts), dtype=np.int64)
                    for idx, keep in current.get(name, []):
                        c, co = routing_statistics(idx, layer.num_experts, keep)
                        total_c += c
                        total_co += co
                    seen.setdefault(name, []).append((total_c, total_co))
    finally:
        for _, layer in layers:
            layer.observers.remove(observe)
    return seen


@pytest.mark.parametrize("make", [tiny_switch, tiny_nllb], ids=["switch", "nllb"])
def test_profile_counts_equal_manual_count(make):
    model = make(num_experts=4)
    batches = _batches(3)
    trace = profile(model, batches, progress=False)
    assert not hf_moe_opt.is_optimized(model), "a temporary optimization must be undone"
    hf_moe_opt.optimize(model)
    manual = _manual_trace(model, batches)
    assert trace.layers == list(manual)
    assert trace.num_experts == 4
    assert trace.top_k == (1 if make is tiny_switch else 2)
    for name, rows in manual.items():
        np.testing.assert_array_equal(trace.counts(name), np.stack([c for c, _ in rows]))
        np.testing.assert_array_equal(trace.coactivation(name), sum(co for _, co in rows))
        assert trace.coactivation_batches(name) == len(batches)
    # Capacity drops are not counted: Switch capacity 3 per sequence caps every expert.
    if make is tiny_switch:
        first = trace.layers[0]
        assert trace.counts(first).max() <= 3 * 3


def test_profile_on_optimized_model_keeps_it_optimized_and_removes_observers():
    model = hf_moe_opt.optimize(tiny_switch(num_experts=4))
    trace = profile(model, _batches(2), progress=True)
    assert hf_moe_opt.is_optimized(model)
    assert all(not layer.observers for _, layer in hf_moe_opt.optimized_layers(model))
    assert trace.num_batches() == 2
    with pytest.raises(ValueError, match="already optimized"):
        profile(model, _batches(1), progress=False, capacity="none")


def test_profile_with_generate_accumulates_decode_steps():
    model = tiny_switch(num_experts=4)
    batches = [{"input_ids": b["input_ids"]} for b in _batches(2)]
    trace = profile(
        model,
        batches,
        progress=False,
        run=lambda m, b: m.generate(**b, max_new_tokens=4, do_sample=False),
        capacity="none",
    )
    decoder = [n for n in trace.layers if n.startswith("decoder")][0]
    encoder = [n for n in trace.layers if n.startswith("encoder")][0]
    # Encoder: 3 sequences x 9 tokens once; decoder: 3 sequences x (up to) 4 steps, top-1.
    assert trace.counts(encoder).sum(axis=1).tolist() == [27, 27]
    assert 3 <= trace.counts(decoder).sum(axis=1).min() <= 12


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_profile_trace_round_trips(tmp_path, suffix):
    model = tiny_nllb(num_experts=4)
    trace = profile(model, _batches(3, seed=5), progress=False, max_batches=2, metadata={"dataset": "random"})
    assert trace.num_batches() == 2
    assert trace.metadata["dataset"] == "random"
    path = trace.save(tmp_path / f"trace{suffix}")
    loaded = RoutingTrace.load(path)
    assert loaded == trace
    plan = plan_placement(loaded, 2, "greedy")
    assert plan.layer_names == trace.layers


def _padded_pair(seed: int, lengths=(3, 9)):
    """Two sequences right-padded to one batch, and each alone without padding."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return (ids, mask), [(s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs]


def test_padding_is_not_counted():
    """A padded batch counts what its sequences count alone, in the layers that see the batch's
    tokens (Switch's encoder, a causal model's layers): routers that route padding like any token
    must not make a hot expert of the pad id."""
    from .test_families import tiny_model

    (ids, mask), alone = _padded_pair(0)
    switch = tiny_switch(num_experts=8, expert_capacity=64)
    dec = torch.randint(3, VOCAB, (1, 2))

    def s2s(i, m):
        return {"input_ids": i, "attention_mask": m, "decoder_input_ids": dec.expand(i.shape[0], -1)}

    together = profile(switch, [s2s(ids, mask)], progress=False)
    apart = [profile(switch, [s2s(i, m)], progress=False) for i, m in alone]
    encoder = [n for n in together.layers if n.startswith("encoder.")]
    assert encoder
    for name in encoder:
        want = sum(t.counts(name).sum(0) for t in apart)
        assert (together.counts(name).sum(0) == want).all(), name
        assert together.counts(name).sum() == mask.sum()  # top-1, nothing dropped: one count per real token

    causal = tiny_model("mixtral")
    (ids, mask), alone = _padded_pair(1)
    together = profile(causal, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    apart = [profile(causal, [{"input_ids": i, "attention_mask": m}], progress=False) for i, m in alone]
    for name in together.layers:
        assert (together.counts(name).sum(0) == sum(t.counts(name).sum(0) for t in apart)).all(), name


def test_max_batches_takes_no_extra_batch_from_an_iterator():
    model = tiny_switch(num_experts=4)
    batches = iter(_batches(3))
    trace = profile(model, batches, progress=False, max_batches=2)
    assert trace.num_batches() == 2
    assert len(list(batches)) == 1  # the third batch is still there for the caller


def test_failed_profile_leaves_the_model_as_given():
    """Errors raised after profile() optimized the model (bad metadata, a fractional max_batches) must
    not leave it optimized with observers attached."""
    model = tiny_switch(num_experts=4)
    for kwargs in ({"metadata": {"bad": object()}}, {"max_batches": 2.9}):
        with pytest.raises(ValueError):
            profile(model, _batches(3), progress=False, **kwargs)
        assert not hf_moe_opt.is_optimized(model)
    hf_moe_opt.optimize(model)
    with pytest.raises(ValueError, match="JSON"):
        profile(model, _batches(1), progress=False, metadata={"bad": object()})
    assert all(not layer.observers for _, layer in hf_moe_opt.optimized_layers(model))
    assert all(not layer._forward_pre_hooks for _, layer in hf_moe_opt.optimized_layers(model))


def test_beam_decode_steps_are_not_masked_by_the_prompt_mask():
    """Beam search decode steps have [batch * beams, 1] rows: with beams == prompt length as many as
    the prompt's mask has entries, but they are not the prompt's tokens and all count."""
    from .test_families import tiny_model

    model = tiny_model("mixtral")
    (ids, mask), _ = _padded_pair(3, lengths=(2, 4))  # [2, 4], two padding entries in sequence 0
    k = model.config.num_experts_per_tok

    def run(m, b):
        return m.generate(**b, max_new_tokens=3, min_new_tokens=3, num_beams=4, do_sample=False)

    trace = profile(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, run=run, coactivation=False)
    # Prefill: beam search repeats each prompt per beam, 2 x 4 x 4 rows (padding counted: the layer does
    # not see the batch's own [2, 4] shape); then 2 decode steps of 2 x 4 rows each, all real.
    for name in trace.layers:
        assert trace.counts(name).sum() == (2 * 4 * 4 + 2 * 2 * 4) * k, name
