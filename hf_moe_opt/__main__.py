"""``python -m hf_moe_opt``: the ``hf-moe-opt`` command line."""

import sys

from .cli import main

sys.exit(main())
