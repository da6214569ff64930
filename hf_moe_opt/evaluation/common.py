"""Shared pieces of the evaluations: models, data, devices, meters and the drop counter.

User mistakes raise :class:`EvalError` (a ``ValueError``) with a one-line message; the CLI prints it
and exits with status 2.
"""

from __future__ import annotations

import gc
import gzip
import json
import math
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..assets import SHIPPED_MODELS as _SHIPPED

SHIPPED_MODELS = tuple(_SHIPPED)  # the names of hf_moe_opt.assets.SHIPPED_MODELS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_SUBDIR = Path("shared") / "data" / "ddtp"

# "Unchanged" tolerance on the perplexity (relative difference) for capacity="model", by dtype. The
# optimized layer sums the same products in a different order (grouped GEMM vs one Linear per expert),
# so results agree to rounding, not bit for bit; a routing near-tie may flip under that rounding.
PPL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


class EvalError(ValueError):
    """A user-facing problem (bad argument, missing file): reported on one line, exit status 2."""


# ----------------------------------------------------------------------------- models
def asset_dir(name: str) -> Path:
    """Folder of a checkpoint shipped in ``hf_moe_opt/assets`` (it may not exist)."""
    return Path(str(resources.files("hf_moe_opt").joinpath("assets", name)))


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """``(what to pass to from_pretrained, kind)`` with kind ``"shipped"``, ``"local"`` or ``"hub"``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvalError(f"model folder {path} has no config.json")
        return str(path), "local"
    if path.exists():
        raise EvalError(f"model path {path} is a file; pass the folder holding config.json")
    short = name_or_path.rstrip("/").split("/")[-1]
    if short in SHIPPED_MODELS and name_or_path in (short, f"hf_moe_opt/assets/{short}"):
        shipped = asset_dir(short)
        if not (shipped / "config.json").is_file():
            raise EvalError(f"the shipped model {short} is not in this installation ({shipped})")
        return str(shipped), "shipped"
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise EvalError(f"model path {name_or_path} does not exist")
    return name_or_path, "hub"


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub's host name resolves here. Without a network, loading a Hub name
    would retry for about half a minute before failing; such loads read only the local cache instead."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _load_options(source: str) -> dict:
    """``from_pretrained`` options for ``source``: the local cache only for a Hub name while the Hub is
    out of reach (a folder never goes to the Hub)."""
    if Path(source).expanduser().is_dir() or hub_reachable():
        return {}
    return {"local_files_only": True}


def _load_error(what: str, source: str, options: dict, e: Exception) -> EvalError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if options.get("local_files_only"):
        first = (
            "the Hugging Face Hub cannot be reached from here and it is not in the local cache "
            "(download it where there is a network, or pass a local folder)"
        )
    return EvalError(f"cannot load {what} {source!r}: {first}")


def load_model(source: str, kind: str, dtype: torch.dtype, device: torch.device):
    """Load ``(model, tokenizer)``; ``kind`` is ``"seq2seq"`` or ``"causal"``. Errors become one line."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    options = _load_options(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = cls.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError) as e:
        raise _load_error("model", source, options, e) from e
    return model.to(device).eval(), tokenizer


def load_config(source: str):
    """The model's config (only ``config.json`` is read or fetched). Errors become one line."""
    from transformers import AutoConfig

    options = _load_options(source)
    try:
        return AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError) as e:
        raise _load_error("the config of", source, options, e) from e


def model_kind(source: str) -> str:
    """``"seq2seq"`` or ``"causal"`` from the config (encoder-decoder or not)."""
    return "seq2seq" if getattr(load_config(source), "is_encoder_decoder", False) else "causal"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------- arguments
def parse_device(name: str) -> torch.device:
    """A torch device that exists here; one-line errors otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise EvalError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise EvalError(f"unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise EvalError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise EvalError(f"{name} must be a positive integer, got {value}")


# ----------------------------------------------------------------------------- data
def default_data_file(filename: str) -> Path:
    """``../shared/data/ddtp/<filename>`` next to the source checkout (or the working directory)."""
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [repo_root.parent / DATA_SUBDIR, Path.cwd().parent / DATA_SUBDIR, Path.cwd() / DATA_SUBDIR]
    for folder in candidates:
        if (folder / filename).is_file():
            return folder / filename
    raise EvalError(f"no default data ({DATA_SUBDIR / filename} not found); pass --data FILE or --dataset NAME")


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last == ".tsv":
        return "tsv"
    return "text"


def _field(record: dict, name: str, path: Path, line_no: int) -> str:
    if name not in record:
        raise EvalError(f"{path}:{line_no}: no field {name!r} (fields: {', '.join(map(str, record))})")
    value = record[name]
    if not isinstance(value, str):
        raise EvalError(f"{path}:{line_no}: field {name!r} is not a string")
    return value


@dataclass
class DataSpec:
    """Where the evaluation text comes from: a local file or a ``datasets`` dataset."""

    path: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    text_field: str = "text"
    source_field: str = "source"
    target_field: str = "target"
    source_lang: str | None = None
    target_lang: str | None = None
    limit: int | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        if self.path is not None:
            return {"file": str(self.path), "format": _format_of(self.path), "limit": self.limit}
        return {"dataset": self.dataset, "config": self.dataset_config, "split": self.split, "limit": self.limit}


def _pair_from_record(record: dict, spec: DataSpec, where: str) -> tuple[str, str]:
    translation = record.get("translation")
    if isinstance(translation, dict) and spec.source_lang and spec.target_lang:
        if spec.source_lang not in translation or spec.target_lang not in translation:
            raise EvalError(f"{where}: 'translation' has no {spec.source_lang!r}/{spec.target_lang!r} entries")
        return str(translation[spec.source_lang]), str(translation[spec.target_lang])
    for name in (spec.source_field, spec.target_field):
        if name not in record:
            hint = " (for a 'translation' field pass --translation-keys SRC TGT)" if translation else ""
            raise EvalError(f"{where}: no field {name!r}{hint}")
    return str(record[spec.source_field]), str(record[spec.target_field])


def read_local(spec: DataSpec, pairs: bool) -> list:
    """Texts (``pairs=False``) or (source, target) pairs from a text / JSON-lines / TSV file (``.gz`` ok)."""
    path = spec.path
    assert path is not None
    if not path.is_file():
        raise EvalError(f"data file {path} does not exist")
    fmt = _format_of(path)
    out: list = []
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if fmt == "jsonl":
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                    if not isinstance(record, dict):
                        raise EvalError(f"{path}:{line_no}: expected a JSON object per line")
                    if pairs:
                        item = _pair_from_record(record, spec, f"{path}:{line_no}")
                    else:
                        item = _field(record, spec.text_field, path, line_no)
                elif fmt == "tsv":
                    cols = line.split("\t")
                    if pairs:
                        if len(cols) < 2:
                            raise EvalError(f"{path}:{line_no}: expected 'source<TAB>target'")
                        item = (cols[0], cols[1])
                    else:
                        if spec.text_field.isdigit():
                            column = int(spec.text_field)
                        elif spec.text_field == DataSpec.text_field:  # the default: the first column
                            column = 0
                        else:
                            raise EvalError(
                                f"{path}: a TSV file's text field is a column number, not {spec.text_field!r}"
                            )
                        if column >= len(cols):
                            raise EvalError(f"{path}:{line_no}: no column {column}")
                        item = cols[column]
                else:
                    if pairs:
                        raise EvalError(f"{path}: translation data must be TSV or JSON lines, not plain text")
                    if spec.text_field != DataSpec.text_field:
                        raise EvalError(
                            f"{path}: --text-field {spec.text_field!r} names a field, but this file is plain text "
                            "(one example a line)"
                        )
                    item = line
                if pairs and not (item[0].strip() and item[1].strip()):
                    continue
                out.append(tuple(s.strip() for s in item) if pairs else item.strip())
                if spec.limit is not None and len(out) >= spec.limit:
                    break
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise EvalError(f"cannot read {path}: {e}") from e
    if not out:
        raise EvalError(f"{path} holds no usable lines")
    return out


@contextmanager
def _hub_offline(offline: bool):
    """``datasets`` and ``huggingface_hub`` in offline mode (their import-time settings) while active."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def read_dataset(spec: DataSpec, pairs: bool) -> list:
    """Texts or pairs from ``datasets.load_dataset(name, config, split=...)``."""
    try:
        import datasets
    except ImportError as e:
        raise EvalError("--dataset needs the `datasets` package (pip install datasets)") from e
    # Without a network a Hub name would retry for half a minute: read the local cache only then.
    offline = not Path(spec.dataset).expanduser().exists() and not hub_reachable()
    try:
        with _hub_offline(offline):
            ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
    except Exception as e:  # datasets raises many types (connection, missing config, missing split)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if offline:
            first = f"the Hugging Face Hub cannot be reached from here and it is not in the local cache ({first})"
        raise EvalError(f"cannot load dataset {spec.dataset!r}: {first}") from e
    out: list = []
    for i, record in enumerate(ds):
        where = f"{spec.dataset}[{i}]"
        if pairs:
            src, tgt = _pair_from_record(record, spec, where)
            if src.strip() and tgt.strip():
                out.append((src.strip(), tgt.strip()))
        else:
            if spec.text_field not in record:
                raise EvalError(f"{where}: no field {spec.text_field!r} (fields: {', '.join(record)})")
            text = str(record[spec.text_field]).strip()
            if text:
                out.append(text)
        if spec.limit is not None and len(out) >= spec.limit:
            break
    if not out:
        raise EvalError(f"dataset {spec.dataset!r} split {spec.split!r} holds no usable records")
    return out


def read_data(spec: DataSpec, pairs: bool) -> list:
    return read_local(spec, pairs) if spec.path is not None else read_dataset(spec, pairs)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (shortest first, stable), cut into batches of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- meters
def _release_free_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so an RSS baseline does not hide reuse."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform
        return None


class PeakMemory:
    """Peak memory above the level at the start of a ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (exact, tensors
    only). CPU: the process RSS sampled every 2 ms by a thread, peak minus the RSS at the start
    (approximate: includes allocator caching and anything else the process allocates meanwhile, and
    misses peaks shorter than the sampling interval).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.method = (
            "cuda max_memory_allocated - memory_allocated at start"
            if device.type == "cuda"
            else "cpu: peak process RSS (sampled every 2 ms) - RSS at start (after gc and malloc_trim); approximate"
        )

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._base is None:
            self.method = "unavailable (no /proc/self/statm and no psutil)"
            return
        self._stop.set()
        self._thread.join()
        rss = _rss_bytes()
        self._peak = max(self._peak, rss or 0)
        self.peak_bytes = self._peak - self._base


class Stopwatch:
    """Accumulates wall-clock seconds of timed sections (synchronising CUDA around each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    @contextmanager
    def time(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start


def versions() -> dict[str, str]:
    import transformers

    import hf_moe_opt

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_moe_opt": hf_moe_opt.__version__,
    }
    from importlib import metadata

    for name in ("tokenizers", "sacrebleu", "evaluate", "datasets"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return v


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- NLLB-MoE correctness
def transformers_nllb_block_is_correct() -> bool:
    """Whether the installed transformers' ``NllbMoeSparseMLP`` matches the correct eager reference.

    Checked numerically on a small random block (eval mode, capacity fraction 1.0): transformers
    5.0-5.25 run only experts 0 and 1 and fail this.
    """
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    from ..baselines import NllbMoeEagerReference

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        config = NllbMoeConfig(d_model=16, num_experts=4, expert_capacity=64, moe_token_dropout=0.0)
        block = NllbMoeSparseMLP(config, ffn_dim=32).eval()
        with torch.no_grad():
            block.router.classifier.weight.normal_(0.0, 1.0)
            x = torch.randn(2, 8, 16)
            want = NllbMoeEagerReference(block)(x)
            try:
                got = block(x)
            except Exception:  # an HF block that cannot even run is not correct
                return False
            got = got[0] if isinstance(got, tuple) else got
        return bool(torch.allclose(got, want, atol=1e-5, rtol=1e-4))
    finally:
        torch.random.set_rng_state(state)


def transformers_switch_applies_capacity() -> bool:
    """Whether the installed transformers' ``SwitchTransformersSparseMLP`` drops tokens over capacity.

    Checked on a small block in eval mode: three tokens all routed to expert 0 of capacity 1 must leave
    two with a zero MLP output. transformers 5.0-5.17 fail this (their router's cumsum runs over a
    size-1 dimension, so capacity never applies); 4.57 and >= 5.23 pass.
    """
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        config = SwitchTransformersConfig(d_model=4, d_ff=8, num_experts=2, expert_capacity=1)
        block = SwitchTransformersSparseMLP(config).eval()
        with torch.no_grad():
            block.router.classifier.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))  # expert 0 always wins
            out = block(torch.rand(1, 3, 4) + 0.5)
        out = out[0] if isinstance(out, tuple) else out
        return bool(out[0, 0].abs().sum() > 0 and out[0, 1:].abs().sum() == 0)
    finally:
        torch.random.set_rng_state(state)


# ----------------------------------------------------------------------------- dropped tokens
SPARSE_BLOCKS = {
    "SwitchTransformersSparseMLP": "switch",
    "SwitchEagerReference": "switch",
    "NllbMoeSparseMLP": "nllb",
    "NllbMoeEagerReference": "nllb",
}


def _keep(routing) -> torch.Tensor:
    """The routing's keep mask as a tensor (a ``None`` mask means nothing is dropped)."""
    if routing.keep is not None:
        return routing.keep
    return torch.ones_like(routing.expert_index, dtype=torch.bool)


class DropCounter:
    """Counts, on an un-optimized model, the routed tokens that the model's capacity rule drops.

    A forward pre-hook on every sparse block recomputes the block's routing from its input with the
    project's routers (:func:`hf_moe_opt.routing.switch_route` / :func:`~hf_moe_opt.routing.nllb_route`,
    the rules ``optimize(capacity="model")`` reproduces) and counts, among the tokens marked real by
    :meth:`set_masks`, the (token, choice) assignments whose ``keep`` is False. NLLB-MoE padding removed
    from routing is not a drop. Counting is active only inside :meth:`counting`.
    """

    def __init__(self, model: nn.Module):
        self.active = False
        self.masks: dict[str, torch.Tensor | None] = {"encoder": None, "decoder": None}
        self.per_layer: dict[str, list[int]] = {}
        self._row_drops: torch.Tensor | None = None
        self._handles = []
        for name, module in model.named_modules():
            family = SPARSE_BLOCKS.get(type(module).__name__)
            if family is None:
                continue
            self.per_layer[name] = [0, 0]  # dropped, routed
            hook = self._switch_hook if family == "switch" else self._nllb_hook
            self._handles.append(
                module.register_forward_pre_hook(lambda m, a, k, n=name, h=hook: h(n, m, a, k), with_kwargs=True)
            )

    def set_masks(self, encoder: torch.Tensor | None, decoder: torch.Tensor | None) -> None:
        """Real-token masks ``[B, S]`` of the encoder input and decoder input of the coming forward."""
        self.masks = {"encoder": encoder, "decoder": decoder}

    def reset_rows(self) -> None:
        """Forget which rows of the previous batch had drops."""
        self._row_drops = None

    def rows_with_drops(self, row: int) -> bool:
        """Whether any token of batch row ``row`` was dropped in any sparse layer (since ``reset_rows``)."""
        return self._row_drops is not None and bool(self._row_drops[row])

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _real(self, name: str, batch: int, seq: int) -> torch.Tensor | None:
        mask = self.masks["decoder" if "decoder" in name else "encoder"]
        if mask is None or tuple(mask.shape) != (batch, seq):
            return None
        return mask.reshape(-1).bool()

    def _add(
        self, name: str, keep: torch.Tensor, batch: int, real: torch.Tensor | None, eligible: torch.Tensor | None
    ) -> None:
        rows = torch.ones(keep.shape[0], dtype=torch.bool, device=keep.device)
        if real is not None:
            rows &= real.to(keep.device)
        if eligible is not None:
            rows &= eligible
        dropped = (~keep & rows[:, None]).any(dim=1)
        counts = self.per_layer[name]
        counts[0] += int((~keep[rows]).sum())
        counts[1] += int(rows.sum()) * keep.shape[1]
        per_row = dropped.view(batch, -1).any(dim=1).cpu()
        self._row_drops = per_row if self._row_drops is None else (self._row_drops | per_row)

    def _switch_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        from ..routing import router_logits, switch_route

        hidden = args[0] if args else kwargs["hidden_states"]
        router = module.router
        with torch.no_grad():
            logits = router_logits(hidden, router.classifier, getattr(router, "dtype", torch.float32))
            routing = switch_route(logits, hidden.dtype, router.expert_capacity)
        batch, seq = hidden.shape[0], hidden.shape[1]
        self._add(name, _keep(routing), batch, self._real(name, batch, seq), None)

    def _nllb_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        from ..routing import nllb_route, router_logits, token_padding_mask

        hidden = args[0] if args else kwargs["hidden_states"]
        padding_mask = args[1] if len(args) > 1 else kwargs.get("padding_mask", kwargs.get("attention_mask"))
        router = module.router
        batch, seq, dim = hidden.shape
        n = batch * seq
        with torch.no_grad():
            padding = None if router.router_ignore_padding_tokens else token_padding_mask(padding_mask, batch, seq)
            fraction = router.moe_eval_capacity_token_fraction
            if fraction > 0:
                capacity = math.ceil(fraction * n)
            else:
                capacity = router.expert_capacity or 2 * math.ceil(n / router.num_experts)
            x = hidden.reshape(n, dim)
            logits = router_logits(x, router.classifier, getattr(router, "dtype", torch.float32))
            # "random" / "sampling" policies are stochastic: count with the deterministic "all" rule.
            routing = nllb_route(
                logits,
                hidden.dtype,
                capacity=capacity,
                padding=padding,
                second_expert_policy="all",
                normalize_before=router.normalize_router_prob_before_dropping,
                batch_prioritized=router.batch_prioritized_routing,
            )
        eligible = None if padding is None else ~padding
        self._add(name, _keep(routing), batch, self._real(name, batch, seq), eligible)

    def summary(self) -> dict:
        dropped = sum(c[0] for c in self.per_layer.values())
        routed = sum(c[1] for c in self.per_layer.values())
        return {
            "definition": (
                "share of the (real token, expert choice) assignments of the teacher-forced passes that the "
                "original model's capacity rule drops (recomputed from each sparse block's input with the rule "
                "optimize(capacity='model') reproduces); dropped tokens get only the residual"
            ),
            "dropped": dropped,
            "routed": routed,
            "share": dropped / routed if routed else 0.0,
            "per_layer": {
                n: {"dropped": c[0], "routed": c[1], "share": c[0] / c[1] if c[1] else 0.0}
                for n, c in self.per_layer.items()
            },
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
