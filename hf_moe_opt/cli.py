"""``hf-moe-opt`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .argparsing import OneLineErrorParser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_device(name: str) -> None:
    """A device that exists here (cpu, cuda, cuda:N), checked before any work; one-line errors otherwise."""
    from .evaluation.common import parse_device

    parse_device(name)


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_output(option: str, path: str | None, suffixes: tuple[str, ...] | None = None) -> None:
    """An output file must be writable where it is named before the work starts, not be found
    unwritable after it: its folder exists, it is not a folder, and it has a suffix it can be written
    in (``suffixes``; a plot without one would be written under another name)."""
    if not path:
        return
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path}: name a file ending in one of {', '.join(suffixes)}")


def _demo_settings(args: argparse.Namespace) -> dict:
    """What produced a demo JSON: the command, its settings, the versions and the machine."""
    from .evaluation.common import machine, versions

    return {
        "command": " ".join(["hf-moe-opt", *args.argv]),
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
        "cache_fraction": args.cache_fraction,
        "repeats": args.repeats,
        "versions": versions(),
        "machine": machine(torch.device(args.device)),
    }


def _demo(args: argparse.Namespace) -> int:
    from .demo import as_dict, format_table, plot, run_demo

    _check_device(args.device)
    _check_output("--plot", args.plot, PLOT_SUFFIXES)
    _check_output("--json", args.json)
    if not 0 < args.cache_fraction <= 1:
        raise ValueError("--cache-fraction must be in (0, 1]")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    result = run_demo(args.device, DTYPES[args.dtype], args.backend, args.cache_fraction, args.repeats)
    print(format_table(result))
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**_demo_settings(args), **as_dict(result)}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    smoke = args.which == "model" and "--cpu-smoke" in args.rest  # the one benchmark with a CPU mode
    if not torch.cuda.is_available() and not smoke and not {"-h", "--help"} & set(args.rest):
        raise ValueError(
            "benchmarks need a CUDA device (none is available here; `bench model --cpu-smoke` runs on a CPU)"
        )
    module = importlib.import_module(f".benchmarking.{args.which}", __package__)
    try:
        return module.main(args.rest, prog=f"hf-moe-opt bench {args.which}")
    except SystemExit as e:  # the benchmark's own argument errors: its parser printed them already
        return e.code if isinstance(e.code, int) else 2


def _load_model(name: str, device: str, dtype: str):
    """``(source, model, tokenizer)``; a missing or broken model is a one-line error, as in eval-lm."""
    from .evaluation.common import load_model, model_kind, parse_device, resolve_model

    source, _ = resolve_model(name)
    model, tokenizer = load_model(source, model_kind(source), DTYPES[dtype], parse_device(device))
    return source, model, tokenizer


def _check(args: argparse.Namespace) -> int:
    from .evaluation.common import load_config, resolve_model
    from .support import check_support, write_report

    _check_output("--json", args.json, (".json",))
    source, _ = resolve_model(args.model)
    report = check_support(load_config(source), dtype=DTYPES[args.dtype], gpu_memory=args.gpu_memory)
    print(report.summary())
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}")
    return 0 if report.supported else 1


def _profile(args: argparse.Namespace) -> int:
    from .evaluation.common import DataSpec, read_data
    from .placement import profile

    if args.batches <= 0 or args.batch_size <= 0 or args.max_length <= 0:
        raise ValueError("--batches, --batch-size and --max-length must be positive")
    _check_device(args.device)
    _check_output("--out", args.out, (".json", ".npz"))
    source, model, tok = _load_model(args.model, args.device, args.dtype)
    texts = read_data(DataSpec(path=Path(args.data), limit=args.batches * args.batch_size), pairs=False)
    batches = []
    for i in range(0, len(texts), args.batch_size):
        chunk = [t if isinstance(t, str) else t[0] for t in texts[i : i + args.batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
        if model.config.is_encoder_decoder:
            # The decoder needs targets to run; its position i is real exactly when target i is, so the
            # tokens' own mask keeps padding out of the decoder layers' counts too.
            batches.append(
                {**enc, "labels": enc["input_ids"].clamp(min=0), "decoder_attention_mask": enc["attention_mask"]}
            )
        else:
            batches.append(dict(enc))
    trace = profile(model, batches, progress=True, metadata={"model": source})
    trace.save(args.out)
    print(f"profiled {len(batches)} batches, {len(trace.layers)} MoE layers; wrote {args.out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .placement import RoutingTrace, plan_placement

    _check_output("--out", args.out, (".json",))
    if args.spare_slots is not None and args.strategy != "replicate":
        raise ValueError(f"--spare-slots applies to --strategy replicate, not {args.strategy}")
    if args.spare_slots is not None and args.spare_slots < 0:
        raise ValueError(f"--spare-slots must be >= 0, got {args.spare_slots}")
    trace = RoutingTrace.load(args.trace)
    spare = {"replicate": 1 if args.spare_slots is None else args.spare_slots}
    # The chosen strategy first: if it cannot place this trace, that is the error to report.
    chosen = plan_placement(trace, args.devices, strategy=args.strategy, spare_slots=spare.get(args.strategy, 0))
    if min(trace.num_batches(layer) for layer in trace.layers) < 2:
        print("the trace holds one batch: no held-out half to compare the strategies on (profile more batches)")
    else:
        _compare_strategies(trace, args.devices, spare, args.trace)
    chosen.save(args.out)
    print(f"wrote the {args.strategy} plan for {args.devices} devices (fitted on the whole trace) to {args.out}")
    return 0


def _compare_strategies(trace, devices: int, spare: dict, source: str) -> None:
    """Every strategy fitted on the first half of ``trace``, judged on the second."""
    from .placement import plan_placement

    fit, held_out = trace.split(0.5)
    print(f"{'strategy':<16} {'avg max/mean':>12} {'worst':>8}   (held-out half of {source})")
    for strategy in ("round_robin", "greedy", "anticorrelation", "replicate"):
        try:
            plan = plan_placement(fit, devices, strategy=strategy, spare_slots=spare.get(strategy, 0))
        except ValueError as err:  # another strategy's constraint (e.g. equal expert counts): say why, go on
            print(f"{strategy:<16} {'n/a':>12} {'':>8}   ({err})")
            continue
        overall = plan.evaluate(held_out)["overall"]
        print(f"{strategy:<16} {overall['avg_max_over_mean']:>12.3f} {overall['worst_max_over_mean']:>8.3f}")


def _eval(args: argparse.Namespace) -> int:
    import importlib

    from .evaluation.report import format_report, write_json

    module = importlib.import_module(f".evaluation.{args.eval_module}", __package__)
    report = module.run(args)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    verdict = report["unchanged"]
    changed = not (verdict["unchanged"] or verdict.get("differences_are_rounding"))
    return 1 if args.fail_if_changed and changed else 0


def _add_eval_commands(sub) -> None:
    from .evaluation import lm, mt

    for name, module, key, help_text in (
        ("eval-lm", lm, "lm", "perplexity of the original vs the optimized model (default: shipped Switch model)"),
        ("eval-mt", mt, "mt", "BLEU/chrF of the original vs the optimized model (default: shipped NLLB-MoE model)"),
    ):
        p = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(p)
        p.set_defaults(func=_eval, eval_module=key)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineErrorParser(prog="hf-moe-opt", description="Fast MoE inference for Hugging Face models")
    parser.add_argument("--version", action="version", version=f"hf-moe-opt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the shipped MoE models, original vs optimized (offline)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    demo.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    demo.add_argument(
        "--cache-fraction",
        type=float,
        default=0.5,
        help="fraction of each layer's experts kept on the device, in (0, 1]",
    )
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median), after one warm-up")
    demo.add_argument("--plot", default="hf_moe_opt_demo.png", help="where to save the plot ('' for none)")
    demo.add_argument("--json", help="also write the table as JSON to this path")
    demo.set_defaults(func=_demo)
    check = sub.add_parser(
        "check", help="from the config alone: which MoE blocks optimize() replaces, and the experts' size"
    )
    check.add_argument("model", help="shipped model name, local folder or hub name (only config.json is read)")
    check.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the byte counts")
    check.add_argument(
        "--gpu-memory", help="one GPU's memory, e.g. 80GiB: how much of the experts fits beside the rest"
    )
    check.add_argument("--json", help="also write the report as JSON to this path")
    check.set_defaults(func=_check)
    _add_eval_commands(sub)
    bench = sub.add_parser("bench", help="CUDA benchmarks: `bench layer|model|families ...` (see --help of each)")
    bench.add_argument("which", choices=["layer", "model", "families"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", default=[], help="arguments for that benchmark")
    bench.set_defaults(func=_bench)
    prof = sub.add_parser("profile", help="record per-layer expert routing of a model on text data")
    prof.add_argument("--model", default="switch-tiny-ddtp", help="shipped model name, local path or hub name")
    prof.add_argument("--data", required=True, help="text file (.txt/.jsonl/.tsv, optionally .gz)")
    prof.add_argument("--batches", type=int, default=8)
    prof.add_argument("--batch-size", type=int, default=16)
    prof.add_argument("--max-length", type=int, default=128)
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    prof.add_argument("--out", default="routing_trace.json", help=".json or .npz")
    prof.set_defaults(func=_profile)
    plan = sub.add_parser("plan", help="plan expert placement from a routing trace and compare strategies")
    plan.add_argument("trace", help="a trace written by `hf-moe-opt profile` (.json/.npz)")
    plan.add_argument("--devices", type=int, default=2)
    plan.add_argument("--strategy", choices=["round_robin", "greedy", "anticorrelation", "replicate"], default="greedy")
    plan.add_argument(
        "--spare-slots", type=int, default=None, help="extra expert slots per device for 'replicate' (default 1)"
    )
    plan.add_argument("--out", default="placement_plan.json")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # user-facing errors (bad input, missing files): one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
