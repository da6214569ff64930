"""Dispatch plan timing, graph-replayed: torch's sort path vs the Triton counting sort, with a chunk
sweep (python benchmarks/time_plan.py).

Times are medians over graph replays. Each line prints the floor beside it: the bytes a plan must move
(expert ids, gates and keep mask read once; the plan's per-row and per-expert tensors written once) over
the memory bandwidth measured at the start of the run. Small plans are launch-bound, far above it.
"""

# The timed closures run inside the loop iteration that defines them.
# ruff: noqa: B023, B008
import statistics
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("time_plan.py needs a CUDA GPU")

sys.path.insert(0, ".")
from hf_moe_opt.benchmarking.common import measure_ceilings, memory_bandwidth, print_ceilings
from hf_moe_opt.dispatch.plan import make_plan, torch_plan
from hf_moe_opt.kernels.plan import large_plan

ceilings = measure_ceilings(torch.device("cuda"))
print_ceilings(ceilings, torch.device("cuda"))
PLAN_FIELDS = ("order", "token", "expert", "counts", "offsets", "gate")


def floor_us(plan, *inputs) -> float:
    """Bytes read (inputs) and written (the plan's tensors) once, over the memory bandwidth, in us."""
    tensors = [t for t in inputs if t is not None] + [getattr(plan, f) for f in PLAN_FIELDS]
    return 1e6 * sum(t.numel() * t.element_size() for t in tensors) / memory_bandwidth(ceilings)


def bench(fn, iters=100):
    """Median time of one call of ``fn`` (a graph replay), in us."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


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

        line = f"A={A} k={k} E={E} keep={keep is not None} equal={ok} floor {floor_us(got, idx, gates, keep):.1f}us: "
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
    f"skewed A=32768 E=128 floor {floor_us(make_plan(idx, gates, None, 128), idx, gates):.1f}us:",
    f"torch {bench(graphed(lambda: torch_plan(idx, gates, None, 128))):.1f}us",
    f"triton {bench(graphed(lambda: make_plan(idx, gates, None, 128))):.1f}us",
)
