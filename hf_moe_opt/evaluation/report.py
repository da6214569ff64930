"""Arguments shared by the evaluations, run set-up, the JSON report and the readable table."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    DataSpec,
    EvalError,
    check_positive,
    default_data_file,
    machine,
    parse_device,
    parse_dtype,
    resolve_model,
    versions,
)

UNCHANGED_RULES = {
    "model": (
        "capacity='model': unchanged = every compared generation has identical tokens AND the perplexity "
        "differs from the baseline's by at most the relative tolerance of the dtype (float32 1e-4, bfloat16 "
        "2e-2, float16 1e-2: the optimized layer adds the same products in another order, so results agree "
        "to rounding, not bit for bit) AND (perplexity runs) no target token's NLL differs by more than the "
        "per-token tolerance of the dtype (float32 1e-3, bfloat16 0.1, float16 0.05 nats). The baseline is "
        "the correct model: transformers' own forward, or the eager reference where the installed "
        "transformers' block is wrong. eval-mt in bfloat16/float16: when "
        "translations differ, the baseline and the optimized model are re-run in float32, and "
        "'differences_are_rounding' is true when they agree there (identical tokens, perplexity within 1e-4)."
    ),
    "none": (
        "capacity='none': the optimized model drops no token, the original drops those over its capacity; "
        "only sequences holding a dropped token can change. Reported: the dropped share, the perplexity "
        "change, and how many changed sequences hold no dropped token (expected 0). 'unchanged' then says "
        "whether the result happens to stay within the capacity='model' tolerance."
    ),
}


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_model: str,
    default_data: str,
    batch_size: int | None,
    batch_help: str | None = None,
) -> None:
    g = parser.add_argument_group("model and run")
    g.add_argument(
        "--model", default=default_model, help=f"hub name, local folder, or a shipped model (default {default_model})"
    )
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    g.add_argument("--capacity", default="model", help="optimize(capacity=...): model | none")
    g.add_argument("--backend", default="auto", help="optimize(backend=...): auto | torch | triton")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0, help="torch seed (sampling policies)")
    g.add_argument("--json", help="write the JSON report here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--fail-if-changed",
        action="store_true",
        help="exit 1 when the 'unchanged' check fails (not when a float32 re-run shows the differences are "
        "bfloat16/float16 rounding)",
    )
    d = parser.add_argument_group("data (a local file or a `datasets` dataset)")
    d.add_argument(
        "--data", help=f"text / .jsonl / .tsv file, optionally .gz (default ../shared/data/ddtp/{default_data})"
    )
    d.add_argument("--dataset", help="`datasets` name or path (instead of --data)")
    d.add_argument("--dataset-config", help="`datasets` configuration name")
    d.add_argument("--split", default=None, help="`datasets` split, with --dataset (default test)")
    d.add_argument("--limit", type=int, default=None, help="use the first N records")


@dataclass
class RunSetup:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    model_source: str
    model_origin: str
    data: DataSpec
    progress: bool


def setup_run(
    args: argparse.Namespace,
    default_data: str,
    make_spec: Callable[[dict], DataSpec],
    check_model: Callable[[str], None] | None = None,
) -> RunSetup:
    """Validate the common arguments (one-line :class:`EvalError` on mistakes) and resolve model and data.

    ``check_model`` gets the resolved model source before any data is looked for, so that options
    the model cannot take are refused first (and without reading the data)."""
    from ..experts.backends import BACKENDS
    from ..layer import CAPACITY_MODES

    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device)
    if args.capacity not in CAPACITY_MODES:
        raise EvalError(f"unknown capacity {args.capacity!r}; choose one of {', '.join(CAPACITY_MODES)}")
    if args.backend not in BACKENDS:
        raise EvalError(f"unknown backend {args.backend!r}; choose one of {', '.join(BACKENDS)}")
    if args.backend == "triton" and device.type != "cuda":
        raise EvalError("--backend triton needs --device cuda")
    check_positive("--batch-size", args.batch_size)
    check_positive("--limit", args.limit)
    check_positive("--threads", args.threads)
    if args.data and args.dataset:
        raise EvalError("pass either --data or --dataset, not both")
    if args.dataset_config and not args.dataset:
        raise EvalError("--dataset-config needs --dataset")
    if args.split is not None and not args.dataset:
        raise EvalError("--split needs --dataset (a local file has no splits)")
    if args.json:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise EvalError(f"--json: folder {parent} does not exist")
        if Path(args.json).expanduser().is_dir():
            raise EvalError(f"--json {args.json} is a folder; give a file path")
    source, origin = resolve_model(args.model)
    if check_model is not None:
        check_model(source)
    if args.data:
        spec = {"path": Path(args.data).expanduser(), "limit": args.limit}
    elif args.dataset:
        spec = {"dataset": args.dataset, "dataset_config": args.dataset_config, "split": args.split or "test"}
        spec["limit"] = args.limit
    else:
        spec = {"path": default_data_file(default_data), "limit": args.limit}
    data = make_spec(spec)
    if data.path is not None and not data.path.is_file():
        raise EvalError(f"data file {data.path} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return RunSetup(args, device, dtype, source, origin, data, not args.no_progress)


SCRIPTS = {"eval-lm": "eval/lm_perplexity.py", "eval-mt": "eval/mt_bleu.py"}


def command_line(args: argparse.Namespace) -> str:
    """The command as typed: ``python eval/<script>.py ...`` for the wrapper scripts, else ``hf-moe-opt ...``."""
    argv = getattr(args, "argv", None)
    if not argv:
        return ""
    script = SCRIPTS.get(argv[0])
    if script and Path(sys.argv[0]).name == Path(script).name:
        return " ".join(shlex.quote(a) for a in ["python", script, *argv[1:]])
    return " ".join(shlex.quote(a) for a in ["hf-moe-opt", *argv])


def finish_report(
    setup: RunSetup,
    *,
    task_name: str,
    task: dict,
    phases: dict,
    baseline: str,
    comparisons: dict,
    verdict: dict,
    drops: dict | None,
    notes: list[str],
    scores: dict | None = None,
) -> dict:
    args = setup.args
    model = args.model if setup.model_origin != "shipped" else f"{args.model} (shipped with hf_moe_opt)"
    report = {
        "task": task_name,
        "command": command_line(args),
        "model": model,
        "model_source": setup.model_source
        if setup.model_origin != "shipped"
        else f"hf_moe_opt/assets/{Path(setup.model_source).name}",
        "data": setup.data.describe(),
        "settings": {
            "device": str(setup.device),
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "capacity": args.capacity,
            "backend": args.backend,
            "seed": args.seed,
        },
        "task_settings": task,
        "baseline": baseline,
        "phases": phases,
        "comparisons": comparisons,
        "dropped_by_original": drops,
        "unchanged": {**verdict, "rule": UNCHANGED_RULES[args.capacity]},
        "notes": notes,
        "versions": versions(),
        "machine": machine(setup.device),
    }
    if scores is not None:
        report["scores"] = scores
    return report


def write_json(report: dict, path: str) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(report), indent=2) + "\n", encoding="utf-8")


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def verdict_line(report: dict) -> str:
    """The verdict, with how much differs and, after a float32 re-run, whether that is rounding."""
    v = report["unchanged"]
    dtype = report["settings"]["dtype"]
    where = f"vs {v['against']} (capacity={v['capacity']}, {dtype}; rule in the JSON report)"
    if v["unchanged"]:
        return f"UNCHANGED {where}"
    ppl = "within" if v["perplexity_within_tolerance"] else "outside"
    detail = f": perplexity {ppl} the {dtype} tolerance"
    if "sentences_differing" in v:
        detail = f": {v['sentences_differing']}/{v['sentences']} translations differ, BLEU diff {v['bleu_diff']:+.2f}, "
        detail += f"perplexity {ppl} the {dtype} tolerance"
    else:
        if v.get("sequences_changed"):
            detail += f", {v['sequences_changed']} sequences hold a token NLL beyond {v['token_nll_atol']:g} nats"
        if v.get("generations_differing"):
            detail += f", {v['generations_differing']}/{v['generations']} greedy generations differ"
    check = v.get("float32_check")
    if check is None:
        hint = ""
        if dtype != "float32" and v["perplexity_within_tolerance"]:
            how = "--no-float32-check skipped the float32 re-run" if "sentences" in v else "a float32 run"
            hint = f" (in {dtype} greedy decoding can flip near-ties under rounding; {how} tells)"
        return f"CHANGED {where}{detail}{hint}"
    base = v["against"]
    floor = check[f"{base}_sentences_differing_from_its_float32_run"]
    same32 = f"in float32 they differ in {check['sentences_differing']}/{v['sentences']} translations"
    if v.get("differences_are_rounding"):
        return (
            f"CHANGED ONLY BY {dtype.upper()} ROUNDING {where}{detail}; {same32} (perplexity rel diff "
            f"{check['perplexity_rel_diff']:+.1e}), and {base} alone differs from its own float32 run in "
            f"{floor}/{v['sentences']}: greedy decoding flips near-ties, the model is not changed"
        )
    return f"CHANGED {where}{detail}; {same32} too: not {dtype} rounding"


def format_report(report: dict) -> str:
    """A readable table of a report from :mod:`~hf_moe_opt.evaluation.lm` or :mod:`~hf_moe_opt.evaluation.mt`."""
    names = list(report["phases"])
    s = report["settings"]
    lines = [
        f"{report['task']}: {report['model']} on {json.dumps(report['data'])}",
        f"device {s['device']}, {s['dtype']}, batch {s['batch_size']}, capacity={s['capacity']}, "
        f"backend={s['backend']}",
        "",
    ]
    rows: list[tuple[str, list[str]]] = []
    ph = report["phases"]
    if report["task"] == "mt_bleu":
        rows.append(("BLEU", [_num(ph[n]["bleu"], ".2f") for n in names]))
        rows.append(("chrF", [_num(ph[n]["chrf"], ".2f") for n in names]))
        rows.append(("teacher-forced ppl", [_num(ph[n]["perplexity"], ".4f") for n in names]))
        rows.append(("generated tokens/s", [_num(ph[n]["generated_tokens_per_second"], ".1f") for n in names]))
        rows.append(("sentences/s", [_num(ph[n]["sentences_per_second"], ".2f") for n in names]))
        rows.append(("scoring tokens/s", [_num(ph[n]["tokens_per_second"], ".0f") for n in names]))
        rows.append(("peak mem, generate (MiB)", [_mib(ph[n]["generate_peak_memory_bytes"]) for n in names]))
    else:
        rows.append(("perplexity", [_num(ph[n]["perplexity"], ".4f") for n in names]))
        rows.append(("tokens/s", [_num(ph[n]["tokens_per_second"], ".0f") for n in names]))
    rows.append(("peak mem, scoring (MiB)", [_mib(ph[n]["peak_memory_bytes"]) for n in names]))
    rows.append(("weights (MiB)", [_mib(ph[n]["weight_bytes"]) for n in names]))
    width = max(len(r[0]) for r in rows) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines.append(" " * width + "".join(f"{n:>{col}}" for n in names))
    for label, vals in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>{col}}" for v in vals))
    lines.append("")
    for key, c in report["comparisons"].items():
        parts = [
            f"ppl diff {c['perplexity_diff']:+.3g} (rel {c['perplexity_rel_diff']:+.2e})",
            f"max |dNLL| {c['max_abs_token_nll_diff']:.2e}",
            f"argmax agree {c['argmax_agreement']:.4f}",
            f"changed seqs {c['sequences_changed']}/{c['sequences']}",
        ]
        if "bleu_diff" in c:
            parts.insert(0, f"BLEU diff {c['bleu_diff']:+.2f}, chrF diff {c['chrf_diff']:+.2f}")
        gen = c.get("generation")
        if gen:
            parts.append(f"identical generations {gen['identical_sequences']}/{gen['sequences']}")
        if "sequences_changed_without_any_drop" in c:
            parts.append(f"changed without a drop {c['sequences_changed_without_any_drop']}")
        lines.append(f"{key.replace('_', ' ')}: " + ", ".join(parts))
    drops = report.get("dropped_by_original")
    if drops:
        lines.append(
            f"dropped by the original's capacity rule: {drops['dropped']}/{drops['routed']} "
            f"assignments ({100 * drops['share']:.3f}%)"
        )
    lines.append(verdict_line(report))
    mem = next(iter(ph.values()))["memory_method"]
    lines.append(f"peak memory: {mem}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if str(s["device"]).startswith("cpu"):
        lines.append("note: CPU throughput is indicative only (shared cores vary many-fold between runs)")
    return "\n".join(lines)
