"""``hf-moe-opt`` command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_rows, rows_as_dicts, run_demo

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but no CUDA device is available")
    rows = run_demo(args.device, DTYPES[args.dtype], args.batch, args.seq_len, args.backend)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "rows": rows_as_dicts(rows)}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument mistakes print one line (no usage block) and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _eval(args: argparse.Namespace) -> int:
    import importlib

    from .evaluation.report import format_report, write_json

    module = importlib.import_module(f".evaluation.{args.eval_module}", __package__)
    report = module.run(args)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 1 if args.fail_if_changed and not report["unchanged"]["unchanged"] else 0


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
    parser = _OneLineErrorParser(prog="hf-moe-opt", description="Fast MoE inference for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="original vs optimized on small MoE models (offline)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    demo.add_argument("--json", help="also write the table as JSON to this path")
    demo.set_defaults(func=_demo)
    _add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ValueError as e:  # user-facing errors: one line, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
