"""Where weights are: the GPUs this process can use, and whether accelerate only moves a module's inputs."""

from __future__ import annotations

from typing import Any

import torch


def visible_gpus() -> int:
    """How many CUDA devices are visible here (0 without CUDA, without asking the driver then)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plain_device_hook(hook: Any) -> bool:
    """An accelerate hook that only moves inputs between devices: no offload, no weights map (what a
    ``device_map`` over several GPUs puts on every module). ``SequentialHook``s qualify when all theirs do."""
    inner = getattr(hook, "hooks", None)
    if type(hook).__name__ == "SequentialHook" and inner is not None:
        return all(plain_device_hook(h) for h in inner)
    return (
        type(hook).__name__ == "AlignDevicesHook"
        and not getattr(hook, "offload", False)
        and getattr(hook, "weights_map", None) is None
    )
