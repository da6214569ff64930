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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-opt", description="Fast MoE inference for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="original vs optimized on small MoE models (offline)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    demo.add_argument("--json", help="also write the table as JSON to this path")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # user-facing errors: one line, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
