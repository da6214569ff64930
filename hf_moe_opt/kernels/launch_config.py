"""Launch configurations of the fused MoE kernels, looked up by (GPU name, expert shape, token count).

Tables are JSON files in ``configs/`` next to this module, one per GPU model, named after the
device name with every run of non-alphanumeric characters replaced by ``_`` (``NVIDIA_H200.json``);
a GPU without its own file uses a same-architecture GPU's (:data:`ARCH_TABLES`: Hopper GPUs such
as the H100 use the H200's), and ``default.json`` serves every other device.
``benchmarks/tune_triton.py`` writes the per-GPU files.
A directory named by ``HF_MOE_OPT_TRITON_CONFIGS`` is searched before the shipped one.

File layout::

    {
      "device": "NVIDIA H200",
      "default": [{"tokens": 1, "gemm1": {...}, "gemm2": {...}}, ...],
      "shapes": {"E128_D768_F3072_k1": [{"tokens": 4096, "gemm1": {...}, "gemm2": {...}}, ...]}
    }

Each entry is tuned at one token count; a call uses the shape's entry whose count is nearest on a
log scale (a shape class by token count) if it is within 4x, else the nearer of that and the
file's ``default`` entry. Entries may also carry ``ms`` and ``torch_ms``, the Triton and
torch backends' times measured by the tuning run; ``backend="auto"`` runs the faster one.
``shapes`` entries win over the file's ``default``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
ENV_CONFIG_DIR = "HF_MOE_OPT_TRITON_CONFIGS"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    # GEMM2 only: K split over this many programs per tile (small batches), fp32 partials summed
    # in a fixed order by a combine kernel.
    split_k: int = 1
    # Row tiles of one expert that sweep the column tiles together (L2 reuse of weight tiles).
    group_m: int = 8
    # Tiles loaded by the Hopper tensor memory accelerator through host-built descriptors: 1 = the
    # weight tiles (and GEMM2's rows of h), 2 = the weight tiles only; pointer loads where the GPU or
    # the tensor layout does not allow it.
    tma: int = 0
    # An expert's last row tile holding at most this many rows runs as a tile of this height (a
    # power of two >= 16 below block_m; 0 = off): at ~1-2 row tiles per expert about half the
    # experts end in a tile of a few rows, which otherwise costs a whole block_m-row MMA. On Hopper,
    # tiles under 64 rows multiply with mma.sync rather than wgmma.
    tail_m: int = 0
    # Persistent launch: this many programs per SM loop over the tiles (0 = one program per tile), so
    # a tile's epilogue overlaps the next tile's loads instead of a program's exit and start; with
    # `flatten` the tile and K loops are pipelined as one. Not with split_k; with tail_m each tile
    # takes its height's branch inside the loop.
    persistent: int = 0
    flatten: int = 1

    def __post_init__(self) -> None:
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if self.group_m < 1:
            raise ValueError(f"group_m={self.group_m} must be >= 1")
        if self.tma not in (0, 1, 2):
            raise ValueError(f"tma={self.tma} must be 0, 1 or 2")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            # tl.dot needs power-of-two tiles of at least 16 in every dimension.
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.persistent < 0 or self.flatten not in (0, 1):
            raise ValueError(f"persistent={self.persistent} must be >= 0 and flatten={self.flatten} 0 or 1")
        if self.persistent and self.split_k > 1:
            raise ValueError("a persistent launch (persistent > 0) does not take split_k > 1")
        if self.tail_m and (self.tail_m < 16 or self.tail_m & (self.tail_m - 1) or self.tail_m >= self.block_m):
            raise ValueError(f"tail_m={self.tail_m} must be 0 or a power of two >= 16 below block_m={self.block_m}")

    def to_dict(self) -> dict[str, int]:
        data = asdict(self)
        # Default knobs are left out: tables stay readable by versions that lack them.
        for name, default in (
            ("split_k", 1),
            ("group_m", 8),
            ("tma", 0),
            ("tail_m", 0),
            ("persistent", 0),
            ("flatten", 1),
        ):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> KernelConfig:
        return cls(**{k: int(v) for k, v in data.items()})


# Used when no JSON can be read (package data left out of an install): a reduced default.json.
_BUILTIN_DEFAULT: list[dict] = [
    {
        "tokens": 16,
        "gemm1": {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4},
        "gemm2": {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4},
    },
    {
        "tokens": 4096,
        "gemm1": {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 4, "num_stages": 4},
        "gemm2": {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 4, "num_stages": 4},
    },
]


def shape_key(num_experts: int, hidden: int, ffn: int, top_k: int) -> str:
    return f"E{num_experts}_D{hidden}_F{ffn}_k{top_k}"


def device_file_stem(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


# A GPU without a table of its own uses the table of a GPU of the same architecture (same SM: shared
# memory, tensor cores, TMA; only memory bandwidth and clocks differ) before the generic defaults.
ARCH_TABLES: dict[tuple[int, int], str] = {(9, 0): "NVIDIA H200"}


def table_name(own_name: str, capability: tuple[int, int]) -> str:
    """The device name whose table serves a GPU named ``own_name`` with this compute capability."""
    if _has_table(own_name):
        return own_name
    arch = ARCH_TABLES.get(tuple(capability))
    return arch if arch is not None and _has_table(arch) else own_name


def _has_table(name: str) -> bool:
    stem = device_file_stem(name)
    return any((folder / f"{stem}.json").is_file() for folder in _search_dirs())


@functools.cache
def _device_name(index: int) -> str:
    return table_name(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def device_name(device: torch.device) -> str:
    """Name the device's config table is keyed by: the GPU's own, else a same-architecture GPU's
    (:data:`ARCH_TABLES`); ``"default"`` off CUDA (interpreter runs)."""
    if device.type != "cuda":
        return "default"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_name(index)


def _search_dirs() -> list[Path]:
    dirs = []
    extra = os.environ.get(ENV_CONFIG_DIR)
    if extra:
        dirs.append(Path(extra))
    dirs.append(CONFIG_DIR)
    return dirs


def _read_json(path: Path) -> dict | None:
    try:
        with path.open() as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@functools.cache
def load_table(device_name: str) -> tuple[dict, ...]:
    """Tables that apply to ``device_name``, most specific first (device file, then default.json)."""
    tables = []
    stems = [device_file_stem(device_name)] if device_name != "default" else []
    for stem in [*stems, "default"]:
        for folder in _search_dirs():
            data = _read_json(folder / f"{stem}.json")
            if data is not None:
                tables.append(data)
                break
    tables.append({"default": _BUILTIN_DEFAULT})
    return tuple(tables)


# A shape's entry serves token counts within this factor of its own; farther away the file's default
# list (tuned on another shape, but at about this batch size) is the better guess: tiles sized for
# 4096 tokens waste most of their rows at 64.
_SHAPE_REACH = math.log(4.0)


def _distance(entry: dict, num_tokens: int) -> float:
    return abs(math.log(max(int(entry["tokens"]), 1)) - math.log(max(num_tokens, 1)))


def _nearest(entries: list[dict], num_tokens: int) -> dict:
    return min(entries, key=lambda e: _distance(e, num_tokens))


def _shape_entry(table: dict, key: str, num_tokens: int) -> dict | None:
    """The shape's own entry nearest ``num_tokens`` if it is within reach, else None."""
    entries = table.get("shapes", {}).get(key)
    if not entries:
        return None
    entry = _nearest(entries, num_tokens)
    return entry if _distance(entry, num_tokens) <= _SHAPE_REACH + 1e-9 else None


@functools.lru_cache(maxsize=4096)
def _lookup(device_name: str, key: str, num_tokens: int) -> tuple[KernelConfig, KernelConfig]:
    for table in load_table(device_name):
        entry = _shape_entry(table, key, num_tokens)
        if entry is None:
            # Out of the shape's reach: whichever of its entries and the default list's is nearer.
            candidates = [*table.get("shapes", {}).get(key, []), *table.get("default", [])]
            entry = _nearest(candidates, num_tokens) if candidates else None
        if entry is not None:
            return KernelConfig.from_dict(entry["gemm1"]), KernelConfig.from_dict(entry["gemm2"])
    raise RuntimeError("no launch config found")  # unreachable: the builtin table always matches


@functools.lru_cache(maxsize=4096)
def _torch_faster(device_name: str, key: str, num_tokens: int) -> bool | None:
    for table in load_table(device_name):
        if table.get("shapes", {}).get(key):
            entry = _shape_entry(table, key, num_tokens)
            if entry is not None and "ms" in entry and "torch_ms" in entry:
                return float(entry["torch_ms"]) < float(entry["ms"])
            return None
    return None


def torch_faster(
    device: torch.device, num_experts: int, hidden: int, ffn: int, top_k: int, num_tokens: int
) -> bool | None:
    """Whether the tuning run measured the torch backend faster at the nearest tuned token count.

    None when this GPU's table has no timed entry for the shape (``backend="auto"`` then decides by
    the number of routed rows).
    """
    return _torch_faster(device_name(device), shape_key(num_experts, hidden, ffn, top_k), num_tokens)


def get_configs(
    device: torch.device, num_experts: int, hidden: int, ffn: int, top_k: int, num_tokens: int
) -> tuple[KernelConfig, KernelConfig]:
    """``(gemm1, gemm2)`` launch configs for this device, expert shape and token count."""
    return _lookup(device_name(device), shape_key(num_experts, hidden, ffn, top_k), num_tokens)


def shared_memory_bytes(config: KernelConfig, a_bytes: int, w_bytes: int, w_tiles: int) -> int:
    """Shared memory of the kernels' load pipeline: ``num_stages`` row tiles and ``w_tiles`` weight
    tiles (2 for gated W1) per K step."""
    per_stage = config.block_m * config.block_k * a_bytes + w_tiles * config.block_n * config.block_k * w_bytes
    return config.num_stages * per_stage


@functools.lru_cache(maxsize=1024)
def fit_shared_memory(config: KernelConfig, a_bytes: int, w_bytes: int, w_tiles: int, limit: int) -> KernelConfig:
    """``config``, shrunk until its pipeline fits ``limit`` bytes: an entry tuned for another shape
    (the default list serves gated experts, fp32 weights) may not fit. Pipeline depth goes first,
    down to 3, then the column tile, then depth down to 2, then the K tile."""
    c = config
    while shared_memory_bytes(c, a_bytes, w_bytes, w_tiles) > limit:
        if c.num_stages > 3:
            c = replace(c, num_stages=c.num_stages - 1)
        elif c.block_n > 64:
            c = replace(c, block_n=c.block_n // 2)
        elif c.num_stages > 2:
            c = replace(c, num_stages=c.num_stages - 1)
        elif c.block_k > 16:
            c = replace(c, block_k=c.block_k // 2)
        else:
            break  # the smallest tiles; let the compiler report it
    return c


@functools.cache
def shared_memory_limit(index: int) -> int:
    """Opt-in shared memory per block of CUDA device ``index`` (227 KiB on an H100/H200)."""
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        import triton

        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def clear_cache() -> None:
    """Forget loaded tables (after writing a new JSON file in the same process)."""
    load_table.cache_clear()
    _device_name.cache_clear()
    _lookup.cache_clear()
    _torch_faster.cache_clear()
