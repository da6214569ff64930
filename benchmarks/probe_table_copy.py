"""Does a small host-to-device copy block the host while its stream waits for a long copy?

    python benchmarks/probe_table_copy.py

The expert cache keeps its slot table on the host and copies it to the device after loads, on the
compute stream, which at that point waits for the loads' copies (up to a millisecond and more). A
``non_blocking`` copy from pageable memory may make the host wait until the stream gets there (the
driver stages it); from pinned memory it should return at once. This times the host side of one
1 KiB copy queued behind a long copy on another stream, for both kinds of source memory, and the
same copy with nothing queued.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def host_us(src: torch.Tensor, dst: torch.Tensor, behind: int, repeats: int = 20) -> float:
    """Median host time (µs) of ``dst.copy_(src, non_blocking=True)`` queued behind ``behind`` bytes
    of pinned host-to-device copy on a side stream (0: nothing queued)."""
    device = dst.device
    side = torch.cuda.Stream(device)
    big_src = torch.empty(max(behind, 1), dtype=torch.uint8, pin_memory=True)
    big_dst = torch.empty_like(big_src, device=device)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        if behind:
            with torch.cuda.stream(side):
                big_dst.copy_(big_src, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(side)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_table_copy.py needs CUDA")
        return 1
    device = torch.device("cuda")
    dst = torch.empty(129, dtype=torch.long, device=device)
    pageable = torch.zeros(129, dtype=torch.long)
    pinned = torch.zeros(129, dtype=torch.long, pin_memory=True)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    for behind in (0, 8 << 20, 64 << 20):
        row = {
            "queued_behind_MiB": behind >> 20,
            "pageable_host_us": round(host_us(pageable, dst, behind), 1),
            "pinned_host_us": round(host_us(pinned, dst, behind), 1),
        }
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
