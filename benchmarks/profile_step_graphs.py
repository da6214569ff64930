"""GPU kernels of whole-step CUDA-graph decoding, summed by name (torch.profiler over one generate).

    PYTHONPATH=$PWD python benchmarks/profile_step_graphs.py switch-base-128

Builds the real config with random bf16 weights, ``optimize(model, cuda_graphs="step")``, warms up,
then profiles one greedy generation of 20 new tokens at batch 1 and 8 (prefill included) and prints
the 25 kernels with the most GPU time, with their launch counts. Needs a CUDA device.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_moe_opt  # noqa: E402
from hf_moe_opt.benchmarking.model import random_model  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "switch-base-128"
if not torch.cuda.is_available():
    sys.exit("profile_step_graphs.py needs a CUDA device")
dev = torch.device("cuda")
model = random_model(name, dev)
hf_moe_opt.optimize(model, cuda_graphs="step")
for b in (1, 8):
    ids = torch.randint(3, 1000, (b, 16), device=dev)
    with torch.no_grad():
        for _ in range(2):
            model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
            torch.cuda.synchronize()
    tot, cnt = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:90]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            cnt[ev.name[:90]] += 1
    print(f"== {name} batch {b}: total CUDA {sum(tot.values()) / 1e3:.2f} ms over 20 new tokens")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {v / 1e3:8.3f} ms  {cnt[k]:6d}x  {k}")
