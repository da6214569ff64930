"""Evaluations showing that ``optimize`` leaves a model's quality unchanged.

* :mod:`hf_moe_opt.evaluation.lm`: perplexity (Switch span-corruption denoising; causal LMs with a
  strided window) of the original and the optimized model on the same data.
* :mod:`hf_moe_opt.evaluation.mt`: BLEU / chrF of greedy or beam translations, token-level equality.
* :mod:`hf_moe_opt.evaluation.common`: data loading, model resolution, memory and timing meters.
* :mod:`hf_moe_opt.evaluation.report`: the JSON report and the readable table.

Both are exposed as ``hf-moe-opt eval-lm`` / ``hf-moe-opt eval-mt`` and as ``eval/lm_perplexity.py`` /
``eval/mt_bleu.py``.
"""

from .common import EvalError

__all__ = ["EvalError"]
