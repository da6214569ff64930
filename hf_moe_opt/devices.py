"""What GPUs this process can use: one answer for every check that names a GPU index."""

from __future__ import annotations

import torch


def visible_gpus() -> int:
    """How many CUDA devices are visible here (0 without CUDA, without asking the driver then)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
