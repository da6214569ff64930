"""Wrapper: see :mod:`hf_moe_opt.benchmarking.model` (also ``hf-moe-opt bench model``)."""

import sys

from hf_moe_opt.benchmarking.model import main

if __name__ == "__main__":
    sys.exit(main())
