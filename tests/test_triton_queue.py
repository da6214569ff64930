"""Switch's per-sequence capacity mask in one Triton launch against the torch queue positions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels.queue import fits, sequence_keep  # noqa: E402
from hf_moe_opt.routing.queue import queue_positions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not kernels_interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)


def _reference(expert: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    batch, seq = expert.shape
    key = torch.arange(batch, device=expert.device)[:, None] * num_experts + expert
    position, _ = queue_positions(key.reshape(-1), batch * num_experts)
    return (position < capacity).view(batch, seq)


@pytest.mark.parametrize(
    ("batch", "seq", "experts", "capacity"),
    [(3, 37, 4, 5), (2, 130, 128, 1), (1, 600, 7, 64), (4, 16, 300, 2), (2, 50, 1, 20), (5, 1, 8, 1)],
)
def test_sequence_keep_equals_queue_positions(batch, seq, experts, capacity):
    g = torch.Generator().manual_seed(seq + experts)
    # Skewed routing so that queues overflow: half the tokens on expert 0.
    expert = torch.randint(0, experts, (batch, seq), generator=g)
    expert[torch.rand(batch, seq, generator=g) < 0.5] = 0
    expert = expert.to(DEVICE)
    got = sequence_keep(expert, experts, capacity)
    want = _reference(expert, experts, capacity)
    assert got.dtype == torch.bool and got.shape == (batch, seq)
    assert torch.equal(got, want)
    assert not bool(want.all()) or seq <= capacity  # the cases drop something


def test_all_tokens_on_one_expert_keep_the_first_capacity():
    expert = torch.full((2, 70), 3, device=DEVICE)
    keep = sequence_keep(expert, 8, 9)
    assert keep[:, :9].all() and not keep[:, 9:].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch, seq"):
        sequence_keep(torch.zeros(4, device=DEVICE, dtype=torch.long), 4, 1)
    with pytest.raises(ValueError, match="experts"):
        sequence_keep(torch.zeros(1, 4, device=DEVICE, dtype=torch.long), 2048, 1)
    assert fits(1) and not fits(0)


def test_switch_keep_uses_it_on_cuda_only():
    from hf_moe_opt.routing.switch import _fused_queue

    queue = _fused_queue()
    assert (queue is None) == kernels_interpreted()
