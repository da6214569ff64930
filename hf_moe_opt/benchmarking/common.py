"""Shared pieces of the benchmarks: environment record, measured ceilings, the floor."""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_moe_opt.timing import median_ms

from .read_probe import read_rates

# (num_experts, d_model, d_ff, top_k) of real models' MoE layers.
LAYER_SHAPES = {
    "switch-base-8": (8, 768, 3072, 1),
    "switch-base-128": (128, 768, 3072, 1),
    "switch-large-128": (128, 1024, 4096, 1),
    "nllb-moe-54b": (128, 2048, 8192, 2),
}


def environment() -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def measure_ceilings(device: torch.device, copy_numel: int = 1 << 28, matmul_size: int = 8192) -> dict:
    """Device memory bandwidth and bf16 matmul rate, measured now.

    The bandwidth is the fastest of several streams over the same buffer: a copy (bytes read +
    written), torch's sum and matrix-vector product, and on GPUs the weight streams of
    :mod:`~hf_moe_opt.benchmarking.read_probe` (all read only; each probe's rate is kept as
    ``<probe>_read_bytes_per_s``). A kernel that only reads can beat a
    copy's rate, so a floor built on the copy alone is no floor. The defaults (512 MiB of bf16,
    8192^3 matmul) saturate a data-centre GPU; CPU smoke runs pass less.
    """
    src = torch.ones(copy_numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy_bw = 2 * nbytes / (median_ms(lambda: dst.copy_(src), device, repeats=10, warmup=3) * 1e-3)
    cols = min(8192, copy_numel)
    rows = src[: copy_numel // cols * cols].view(-1, cols)
    vec = torch.ones(cols, dtype=torch.bfloat16, device=device)
    probes = read_rates(device, lambda fn: median_ms(fn, device, repeats=10, warmup=3))
    reads = [
        nbytes / (median_ms(lambda: src.sum(), device, repeats=10, warmup=3) * 1e-3),
        rows.numel() * rows.element_size() / (median_ms(lambda: rows @ vec, device, repeats=10, warmup=3) * 1e-3),
        *probes.values(),
    ]
    m = matmul_size
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms = median_ms(lambda: a @ b, device, repeats=10, warmup=3)
    return {
        "memory_bytes_per_s": max(copy_bw, *reads),
        "copy_bytes_per_s": copy_bw,
        "read_bytes_per_s": max(reads),
        **{f"{name}_read_bytes_per_s": rate for name, rate in probes.items()},
        "bf16_flops_per_s": 2 * m**3 / (ms * 1e-3),
    }


def memory_bandwidth(ceilings: dict) -> float:
    """The bandwidth floors divide bytes by: the fastest measured stream (results written before the
    read-only streams were measured carry only the copy rate)."""
    return ceilings.get("memory_bytes_per_s") or ceilings["copy_bytes_per_s"]


def floor_ms(active_experts: int, d: int, f: int, assignments: int, ceilings: dict, bias: bool = False) -> float:
    """max(bytes of the active experts' weights / memory bandwidth, FLOPs / matmul rate), in ms."""
    weight_bytes = active_experts * (2 * d * f + (d + f if bias else 0)) * 2
    flops = 2 * assignments * 2 * d * f
    return 1e3 * max(weight_bytes / memory_bandwidth(ceilings), flops / ceilings["bf16_flops_per_s"])


def print_ceilings(ceilings: dict, device: torch.device | None = None) -> None:
    """One line with the measured rates (T or G units as they come); on a CPU a warning that the
    floors built from them are rough (small probes), not bounds a run cannot beat."""

    def rate(value: float | None, unit: str, tera_digits: int) -> str:
        if not value:
            return "not measured"
        return f"{value / 1e12:.{tera_digits}f} T{unit}" if value >= 1e12 else f"{value / 1e9:.1f} G{unit}"

    memory = rate(ceilings.get("memory_bytes_per_s"), "B/s", 2)
    copy = rate(ceilings.get("copy_bytes_per_s"), "B/s", 2)
    read = rate(ceilings.get("read_bytes_per_s"), "B/s", 2)
    flops = rate(ceilings.get("bf16_flops_per_s"), "FLOP/s", 0)
    print(f"ceilings: memory {memory} (copy {copy}, read-only {read}), bf16 {flops}", flush=True)
    if device is not None and torch.device(device).type == "cpu":
        print("(on a CPU these come from small probes: the floors below are rough, not bounds)", flush=True)


def pyplot_or_none():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a message) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    return plt


def save_result(result: dict, out: str | Path, plot: Callable[[dict, Path], None]) -> None:
    """Write ``result`` (with the command line that produced it) as JSON and its plot as a PNG beside it."""
    result = {"command": " ".join(sys.argv), **result}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def json_out(value: str) -> Path:
    """``type=`` of a benchmark's ``--out``: a ``.json`` file (its plot goes beside it as ``.png``; a
    missing folder is created when it is written), checked before any work, not after it."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; name a .json file")
    if path.suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"{value}: name a file ending in .json")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {path.parent} is not a folder")
    return path


def add_floor_ratios(row: dict) -> None:
    """``<name>_x_floor`` beside every ``<name>_ms`` timing of ``row`` (its ``floor_ms`` must be set)."""
    for key in [k for k in row if k.endswith("_ms") and k != "floor_ms"]:
        row[key.replace("_ms", "_x_floor")] = row[key] / row["floor_ms"]


def plot_by_shape(result: dict, path: Path, series: list[tuple[str, str]], title: str, width: float = 4.5) -> None:
    """One log-log panel of time vs tokens per ``row["shape"]``; ``series`` are ``(row key, label)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(width * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for key, label in series:
            pts = [(r["tokens"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label, ls="--" if key == "floor_ms" else "-")
        ax.set(xscale="log", yscale="log", title=shape, xlabel="tokens", ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_models_by_batch(
    result: dict,
    path: Path,
    variants: tuple[str, ...],
    ylabel: str,
    floor_label: str,
    suptitle: str,
    title: Callable[[dict], str] = lambda rec: rec["model"],
) -> None:
    """One log-log panel of ``<variant>_ms`` vs batch per ``result["models"]`` record, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, rec in zip(axes[0], models, strict=True):
        rows = rec["batches"]
        batches = [r["batch"] for r in rows]
        for v in variants:
            ys = [r[f"{v}_ms"] for r in rows]
            if all(y is not None for y in ys):
                ax.plot(batches, ys, marker="o", label=v)
        ax.plot(batches, [r["floor_ms"] for r in rows], ls="--", color="k", label=floor_label)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel=ylabel, title=title(rec))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{suptitle}, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_device(cpu_smoke: bool) -> tuple[torch.device, dict] | None:
    """``(device, ceilings measured there)``: the CPU with small probes for a smoke run, else CUDA; None
    (with an error printed) when CUDA is wanted but missing. Prints the environment and ceilings."""
    if cpu_smoke:
        device = torch.device("cpu")
        ceilings = measure_ceilings(device, copy_numel=1 << 22, matmul_size=128)
    elif not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA device (or --cpu-smoke)", file=sys.stderr)
        return None
    else:
        device = torch.device("cuda")
        ceilings = measure_ceilings(device)
    env = environment()
    print(f"{env['device']}: torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}")
    print_ceilings(ceilings, device)
    return device, ceilings


def each_model(names: list[str], run: Callable[[str], dict], device: torch.device) -> list[dict]:
    """``run(name)`` for every model, freeing each model's memory before the next one is built."""
    records = []
    for name in names:
        records.append(run(name))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def add_stack_probe_args(parser, *, warmup: int, steps: int, batches: bool = True) -> None:
    """The options of the probes over ``bench_cache``'s MoE-only stacks: which stacks, how long, where
    the JSON goes (``--replot`` redraws a saved one); ``--smoke`` runs tiny shapes on the CPU."""
    from hf_moe_opt.cache import DEFAULT_POLICY, POLICY_NAMES

    parser.add_argument("--families", nargs="+", choices=["switch", "nllb"], default=["switch", "nllb"])
    if batches:
        parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block (blocks alternate settings)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=json_out)
    parser.add_argument("--replot", type=Path, help="only redraw the plot of a result JSON")


def probe_device(smoke: bool, script: str) -> torch.device | None:
    """CUDA, or for a smoke run the CPU where there is no GPU (compiled Triton kernels need CUDA; the
    CPU smoke run needs ``TRITON_INTERPRET=1``); None (with a message) when CUDA is wanted but missing."""
    if smoke:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        print(f"{script} needs CUDA (--smoke runs on the CPU)", file=sys.stderr)
        return None
    return torch.device("cuda")


def grouped_bars(ax, values: list[dict[str, float]], labels: list[str]) -> None:
    """One group of bars per entry of ``values`` (a bar per key, in the first entry's key order), and
    ``labels`` under the groups."""
    names = list(values[0])
    width = 0.8 / len(names)
    for v, name in enumerate(names):
        xs = [i + v * width for i in range(len(values))]
        ax.bar(xs, [row[name] for row in values], width, label=name, color=f"C{v}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(values))], labels)


def block_ms(model, xs: list, device: torch.device) -> tuple[float, list]:
    """Wall time per call of ``model`` over ``xs`` (the device synchronised before and after) and the
    outputs: a paired probe's timed block."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    outs = [model(x) for x in xs]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / len(xs), outs


def plot_stack_bars(
    rows: list[dict],
    values: str,
    labels: list[str],
    path: Path,
    *,
    ylabel: str,
    title: str,
    target: float | None = None,
) -> None:
    """A grouped bar per row of ``row[values]`` (a dict per variant), with an optional dashed target."""
    plt = pyplot_or_none()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(2.0 * len(rows) + 2, 4))
    grouped_bars(ax, [r[values] for r in rows], labels)
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"{target}x target")
        ax.set_ylim(1.0, max(target + 0.2, 1.05 * max(max(r[values].values()) for r in rows)))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
