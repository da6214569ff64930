"""The demo: the shipped MoE models, original vs optimized, one side-by-side table and a plot.

Runs offline on the two trained checkpoints that ship with the package (a Switch Transformers
span-corruption LM and an NLLB-MoE English->German translator) and on a few sentences written for
the demo. For each model it compares transformers' own forward, (for NLLB-MoE) the correct eager
reference, hf_moe_opt, hf_moe_opt with the fused dense parts (``fuse_dense``: equal to rounding),
hf_moe_opt with expert buffering, and hf_moe_opt with experts placed on two devices: quality
(perplexity / BLEU), identical tokens, time, expert memory on the compute device, cache hit rate and
load balance.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from .api import is_optimized, optimize, restore, stats
from .assets import shipped_model_path
from .baselines import remove_nllb_eager_reference, use_nllb_eager_reference
from .cache import DEFAULT_POLICY
from .demo_inputs import ENGLISH, PAIRS
from .placement import plan_placement, profile


@dataclass
class DemoRow:
    model: str
    variant: str
    quality_name: str
    quality: float | None
    same_tokens: str
    ms: float
    expert_mib: float
    hit_rate: float | None = None
    balance: float | None = None
    note: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow] = field(default_factory=list)
    expert_load: dict[str, list[list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# The demo runs offline on shipped checkpoints; transformers >= 5.25 would fetch Hub kernels by default.
OFFLINE = {"use_kernels": False}


def _cache_stats(model: torch.nn.Module) -> list[dict]:
    return [s for s in stats(model).values() if "slot_bytes" in s] if is_optimized(model) else []


def _expert_mib(model: torch.nn.Module) -> float:
    """MiB of expert weights held on the compute device (cache slots when buffering)."""
    cached = _cache_stats(model)
    if cached:
        return sum(s["slot_bytes"] for s in cached) / 2**20
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name and p.device.type != "meta":
            total += p.numel() * p.element_size()
    return total / 2**20


def _hit_rate(model: torch.nn.Module) -> float | None:
    cached = _cache_stats(model)
    if not cached:
        return None
    hits = sum(s["hits"] for s in cached)
    return hits / max(1, hits + sum(s["misses"] for s in cached))


def _median_ms(fn, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls of ``fn``; the caller has just run it once (the warm-up: the
    run whose outputs the table reports)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _two_devices(device: torch.device) -> list[str]:
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        return ["cuda:0", "cuda:1"]
    return [str(device), str(device)]


def _balance(model, batches, device) -> tuple[object, float, float]:
    """Profile routing, plan greedy placement on two devices; held-out max/mean for round-robin and greedy."""
    trace = profile(model, batches, progress=False)
    fit, held_out = trace.split(0.5)
    greedy = plan_placement(fit, 2, strategy="greedy")
    rr = plan_placement(fit, 2, strategy="round_robin")
    return (
        greedy,
        rr.evaluate(held_out)["overall"]["avg_max_over_mean"],
        greedy.evaluate(held_out)["overall"]["avg_max_over_mean"],
    )


def _balance_note(name: str, rr: float, greedy: float) -> str:
    return f"{name}: held-out max/mean device load on 2 devices: round-robin {rr:.3f}, greedy {greedy:.3f}"


def _load_fractions(trace_model, batches) -> list[list[float]]:
    trace = profile(trace_model, batches, progress=False)
    loads = []
    for layer in trace.layers:
        counts = trace.counts(layer).sum(axis=0)
        loads.append((counts / max(1, counts.sum())).tolist())
    return loads


def _switch_rows(device, dtype, backend, cache_fraction, repeats: int, result: DemoResult) -> None:
    from .evaluation.compare import teacher_forced
    from .evaluation.lm import seq2seq_batches, span_corruption_pairs

    name = "switch-tiny-ddtp (LM)"
    path = shipped_model_path("switch-tiny-ddtp")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, **OFFLINE).to(device).eval()
    pairs = span_corruption_pairs(ENGLISH, tok, max_length=112, seed=1234)
    batches = seq2seq_batches(pairs, batch_size=8, pad_id=tok.pad_token_id)
    prompts = tok(ENGLISH[:8], return_tensors="pt", padding=True).to(device)
    as_inputs = [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels.clamp(min=0)} for b in batches
    ]

    def measure(variant: str, baseline_tokens=None, balance=None):
        with torch.no_grad():
            res = teacher_forced(model, batches, device, variant, progress=False)
            ms = _median_ms(lambda: teacher_forced(model, batches, device, variant, progress=False), repeats)
            tokens = model.generate(**prompts, max_new_tokens=12, do_sample=False)
        same = "baseline" if baseline_tokens is None else ("yes" if torch.equal(tokens, baseline_tokens) else "no")
        result.rows.append(
            DemoRow(name, variant, "ppl", res.perplexity, same, ms, _expert_mib(model), _hit_rate(model), balance)
        )
        return tokens

    base = measure("transformers")
    optimize(model, backend=backend)
    measure("hf_moe_opt", base)
    result.expert_load[name] = _load_fractions(model, as_inputs)
    restore(model)
    optimize(model, backend=backend, fuse_dense=True)
    measure("hf_moe_opt + fuse_dense", base)
    restore(model)
    optimize(model, backend=backend, expert_cache=cache_fraction)
    measure(f"hf_moe_opt + cache {cache_fraction:.0%} ({DEFAULT_POLICY})", base)
    restore(model)
    plan, rr, greedy = _balance(model, as_inputs, device)
    optimize(model, backend=backend, placement=plan, devices=_two_devices(device))
    measure("hf_moe_opt, 2 devices (greedy)", base, balance=greedy)
    result.notes.append(_balance_note(name, rr, greedy))
    restore(model)


def _bleu(hyps: list[str], refs: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def _nllb_rows(device, dtype, backend, cache_fraction, repeats: int, result: DemoResult) -> None:
    from .evaluation.common import transformers_nllb_block_is_correct

    name = "nllb-moe-tiny-ddtp (en->de)"
    path = shipped_model_path("nllb-moe-tiny-ddtp")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, **OFFLINE).to(device).eval()
    src = [s for s, _ in PAIRS]
    refs = [t for _, t in PAIRS]
    batch = tok(src, return_tensors="pt", padding=True).to(device)
    labels = tok(text_target=refs, return_tensors="pt", padding=True).input_ids.to(device)
    profile_inputs = [{**batch, "labels": labels}]

    def measure(variant: str, baseline_tokens=None, balance=None, note=""):
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=64, do_sample=False)
            ms = _median_ms(lambda: model.generate(**batch, max_new_tokens=64, do_sample=False), repeats)
        hyps = tok.batch_decode(tokens, skip_special_tokens=True)
        same = "baseline" if baseline_tokens is None else ("yes" if torch.equal(tokens, baseline_tokens) else "no")
        result.rows.append(
            DemoRow(
                name, variant, "BLEU", _bleu(hyps, refs), same, ms, _expert_mib(model), _hit_rate(model), balance, note
            )  # fmt: skip
        )
        return tokens

    broken = not transformers_nllb_block_is_correct()
    installed = copy.deepcopy(model) if broken else None
    use_nllb_eager_reference(model)
    base = measure("reference (correct eager)")
    remove_nllb_eager_reference(model)
    if installed is not None:
        model, reference_model = installed, model
        measure("transformers (installed)", base, note="wrong: only experts 0 and 1 run")
        model = reference_model
        result.notes.append(
            f"{name}: the installed transformers' NLLB-MoE block is wrong (only experts 0 and 1 run); "
            "'same tokens' and quality compare against the correct eager reference"
        )
    optimize(model, backend=backend)
    measure("hf_moe_opt", base)
    result.expert_load[name] = _load_fractions(model, profile_inputs)
    restore(model)
    optimize(model, backend=backend, fuse_dense=True)
    measure("hf_moe_opt + fuse_dense", base)
    restore(model)
    optimize(model, backend=backend, expert_cache=cache_fraction)
    measure(f"hf_moe_opt + cache {cache_fraction:.0%} ({DEFAULT_POLICY})", base)
    restore(model)
    plan, rr, greedy = _balance(model, profile_inputs * 2, device)
    optimize(model, backend=backend, placement=plan, devices=_two_devices(device))
    measure("hf_moe_opt, 2 devices (greedy)", base, balance=greedy)
    result.notes.append(_balance_note(name, rr, greedy))
    restore(model)


def run_demo(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    cache_fraction: float = 0.5,
    repeats: int = 3,
) -> DemoResult:
    """Run the demo on ``device``; returns the table rows, expert loads and notes.

    Each time is the median of ``repeats`` timed runs after one warm-up run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    dev = torch.device(device)
    result = DemoResult()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        _switch_rows(dev, dtype, backend, cache_fraction, repeats, result)
        _nllb_rows(dev, dtype, backend, cache_fraction, repeats, result)
    if any("pinned" in str(w.message) for w in caught):
        result.notes.append("no pinned host memory here: the cache copies from pageable memory")
    if any("CUDA is available" in str(w.message) for w in caught):
        result.notes.append("the expert cache served the CPU although a GPU is present: --device cuda serves the GPU")
    if dev.type == "cpu":
        result.notes.append(
            "on the CPU the cache's slots and its host copy share one memory: 'expert MiB' counts the slots, "
            "what a GPU would hold; here the cache saves nothing"
        )
        result.notes.append(
            "CPU times of these tiny models are indicative only: on shared cores they can differ many-fold "
            "between runs; the GPU benchmarks (`hf-moe-opt bench`) measure speed"
        )
    if dev.type != "cuda" or torch.cuda.device_count() < 2:
        result.notes.append("'2 devices' ran as two copies of one device here: it shows placement, not its speed")
    return result


def format_table(result: DemoResult) -> str:
    m = max([28, *(len(r.model) for r in result.rows)])
    v = max([32, *(len(r.variant) for r in result.rows)])
    head = (
        f"{'model':<{m}} {'variant':<{v}} {'quality':>12} {'same tokens':>11} {'time ms':>9} "
        f"{'expert MiB':>10} {'hit rate':>8} {'max/mean':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result.rows:
        quality = "n/a" if r.quality is None else f"{r.quality_name} {r.quality:.2f}"
        hit = "" if r.hit_rate is None else f"{r.hit_rate:.2f}"
        bal = "" if r.balance is None else f"{r.balance:.3f}"
        lines.append(
            f"{r.model:<{m}} {r.variant:<{v}} {quality:>12} {r.same_tokens:>11} {r.ms:>9.1f} "
            f"{r.expert_mib:>10.2f} {hit:>8} {bal:>8}" + (f"  ({r.note})" if r.note else "")
        )
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def as_dict(result: DemoResult) -> dict:
    return {"rows": [asdict(r) for r in result.rows], "expert_load": result.expert_load, "notes": result.notes}


def plot(result: DemoResult, path: str) -> None:
    """Time per variant, and each model's expert load per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in result.rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 7.5), squeeze=False)
    for col, model in enumerate(models):
        rows = [r for r in result.rows if r.model == model]
        ax = axes[0][col]
        ax.barh([r.variant for r in rows], [r.ms for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set(title=f"{model}: time (ms)", xlabel="ms")
        loads = result.expert_load.get(model, [])
        ax = axes[1][col]
        if loads:
            im = ax.imshow(loads, aspect="auto", cmap="viridis")
            ax.set(title="share of routed tokens per expert", xlabel="expert", ylabel="MoE layer")
            ax.set_yticks(range(len(loads)))
            ax.set_xticks(range(len(loads[0])))
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
