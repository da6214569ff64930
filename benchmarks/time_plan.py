"""Dispatch plan timing, graph-replayed: torch's sort path vs the Triton counting sort, with a chunk
sweep (python benchmarks/time_plan.py).
"""

# The timed closures run inside the loop iteration that defines them.
# ruff: noqa: B023, B008
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("time_plan.py needs a CUDA GPU")

sys.path.insert(0, ".")
from hf_moe_opt.dispatch.plan import make_plan, torch_plan
from hf_moe_opt.kernels.plan import large_plan


def bench(fn, iters=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


for A, k, E in [(4096, 1, 128), (4096, 8, 128), (32768, 2, 128), (32768, 8, 512), (2**17, 8, 128), (16384, 2, 8)]:
    N = A // k
    idx = torch.rand(N, E, device="cuda").topk(k, dim=1).indices
    gates = torch.rand(N, k, device="cuda", dtype=torch.bfloat16)
    for keep in (None, torch.rand(N, k, device="cuda") > 0.1):
        ref, got = torch_plan(idx, gates, keep, E), make_plan(idx, gates, keep, E)
        ok = all(
            torch.equal(getattr(ref, f), getattr(got, f))
            for f in ("order", "token", "expert", "counts", "offsets", "gate")
        )

        def t_torch():
            return torch_plan(idx, gates, keep, E)

        def t_tri():
            return make_plan(idx, gates, keep, E)

        line = f"A={A} k={k} E={E} keep={keep is not None} equal={ok}: "
        line += f"graphed torch {bench(graphed(t_torch)):.1f}us  triton {bench(graphed(t_tri)):.1f}us |"
        if keep is None:
            for chunk in (128, 256, 512, 1024, 2048):
                for inline in (True, False):

                    def f():
                        return large_plan(idx, gates, keep, E, chunk=chunk, inline_scan=inline)

                    line += f" c{chunk}{'i' if inline else 's'}={bench(graphed(f)):.1f}"
        print(line, flush=True)
# skew: everything on one expert
idx = torch.zeros(16384, 2, device="cuda", dtype=torch.long)
idx[:, 1] = 1
gates = torch.rand(16384, 2, device="cuda", dtype=torch.bfloat16)
print(
    "skewed A=32768 E=128:",
    f"torch {bench(graphed(lambda: torch_plan(idx, gates, None, 128))):.1f}us",
    f"triton {bench(graphed(lambda: make_plan(idx, gates, None, 128))):.1f}us",
)
