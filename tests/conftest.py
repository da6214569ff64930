import os

import pytest
import torch

# Triton kernels run in the interpreter where no GPU exists; set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No network here: transformers >= 5.25 would fetch kernels from the Hub for every from_pretrained.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

# Two threads a process; one under pytest-xdist, whose workers already share the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skipif(True, reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
