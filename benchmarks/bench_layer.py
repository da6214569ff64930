"""Wrapper: see :mod:`hf_moe_opt.benchmarking.layer` (also ``hf-moe-opt bench layer``)."""

import sys

from hf_moe_opt.benchmarking.layer import main

if __name__ == "__main__":
    sys.exit(main())
