"""Perplexity of an MoE model before and after ``hf_moe_opt.optimize`` (same as ``hf-moe-opt eval-lm``).

    python eval/lm_perplexity.py --limit 256 --json /tmp/lm.json   # a quick look at 256 texts
    python eval/lm_perplexity.py --json eval/results/cpu_switch_tiny_lm.json --no-progress   # the committed report
    python eval/lm_perplexity.py --help

See ``hf_moe_opt/evaluation/lm.py`` for what is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_moe_opt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval-lm", *sys.argv[1:]]))
