"""``ModelIndex``: one walk of a model, redone only when some module's structure changes."""

from __future__ import annotations

import torch
from torch import nn

from hf_moe_opt.model_index import ModelIndex, structure_version


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))


def _linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def test_walks_once_until_the_structure_changes(monkeypatch):
    model = _model()
    index = ModelIndex(model, _linears)
    walks = []
    original = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if self is model:
            walks.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    first = index.modules()
    assert [n for n, _ in first] == ["0", "1.1"]
    walked = len(walks)  # one walk (parameters() walks the modules too)
    key = index.weights_key()
    assert index.modules() is first and index.weights_key() == key and len(walks) == walked

    model[1][1] = nn.Linear(4, 3)  # a replaced module: new parameters, walked again
    assert index.modules()[1][1] is model[1][1] and len(walks) == 2 * walked
    assert index.weights_key() != key

    version = structure_version()
    model.extra = nn.Linear(2, 2)  # any registration anywhere counts
    assert structure_version() > version
    assert [n for n, _ in index.modules()] == ["0", "1.1", "extra"]

    key = index.weights_key()
    model[0].weight.data = model[0].weight.data.clone()  # no registration: seen by the weights key only
    assert index.weights_key() != key and len(walks) == 3 * walked


def test_parameter_and_buffer_assignments_count():
    model = _model()
    index = ModelIndex(model, _linears)
    key = index.weights_key()
    model[0].weight = nn.Parameter(torch.zeros(4, 4))
    assert index.weights_key() != key
    version = structure_version()
    model[0].register_buffer("scale", torch.ones(1))
    assert structure_version() > version


def test_replaced_buffers_change_the_weights_key():
    """A buffer given new memory (NLLB-MoE regrows its position tables for a longer sequence) changes
    the key as a moved parameter does: graphs that index the old table are dropped."""
    model = _model()
    model[1].register_buffer("table", torch.zeros(6, 4))
    index = ModelIndex(model, _linears)
    key = index.weights_key()
    model[1].table = torch.zeros(12, 4)  # reassigned, as the position embedding does
    assert index.weights_key() != key
    key = index.weights_key()
    model[1].table.add_(1)  # in place: the same memory, graphs stay valid
    assert index.weights_key() == key
