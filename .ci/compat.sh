#!/usr/bin/env bash
# The graph paths, Switch's capacity probe and its reference block again under the oldest transformers the
# GPU machines run (5.17): host reads that only one version makes (e.g. 5.17's eager mask builder copies
# a Python scalar to the device) and blocks that run differently there show up here.
# The older transformers goes into its own folder, ahead of the venv's on PYTHONPATH. If it cannot be
# installed (no such release on the index), the stage says so and is skipped; failing tests fail CI.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
if .venv/bin/python -m pip install -q --no-deps --target "$old" "transformers==5.17.0" "huggingface-hub>=1.5,<2" \
    && .venv/bin/python -m pip install -q --target "$old" httpx \
    && PYTHONPATH="$old" .venv/bin/python -c "import transformers; assert transformers.__version__ == '5.17.0'"; then
  PYTHONPATH="$old:$PWD" .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 \
    tests/test_step_graphs.py tests/test_encoder_graphs.py tests/test_dense.py \
    tests/test_eval.py::test_eval_lm_capacity_none_changes_only_dropped \
    tests/test_eval.py::test_eval_lm_shipped_switch_unchanged \
    tests/test_eval.py::test_switch_capacity_probe_matches_the_known_versions \
    "tests/test_routing.py::test_switch_reference_applies_capacity_per_sequence"
else
  echo "compat: transformers 5.17.0 could not be installed here; stage skipped"
fi
