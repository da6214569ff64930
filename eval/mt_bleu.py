"""BLEU / chrF of an MoE translation model before and after ``hf_moe_opt.optimize`` (= ``hf-moe-opt eval-mt``).

    python eval/mt_bleu.py --limit 200 --json /tmp/mt.json   # a quick look at 200 sentences
    python eval/mt_bleu.py --json eval/results/cpu_nllb_tiny_mt.json --no-progress   # the committed report
    python eval/mt_bleu.py --help

See ``hf_moe_opt/evaluation/mt.py`` for what is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_moe_opt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval-mt", *sys.argv[1:]]))
