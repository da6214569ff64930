#!/usr/bin/env bash
# Read-behind expert caching (cache_misses="read") on one GPU, by stage, so that a device call goes to
# measuring. Run from the repository root with the package importable (PYTHONPATH=$PWD):
#
#   bash benchmarks/host_reads_gpu.sh tests  [OUT_DIR]  # GPU tests: read-behind, offset kernels, step graphs with a cache
#   bash benchmarks/host_reads_gpu.sh probe  [OUT_DIR]  # MoE-only stacks, copy vs read vs resident, 50% and 25% resident
#   bash benchmarks/host_reads_gpu.sh model  [OUT_DIR]  # switch-base-128 at 50% and 25%: copy, read, read + step graphs, vs resident
#   bash benchmarks/host_reads_gpu.sh model8 [OUT_DIR]  # the same at batch 8 (step graphs serve up to 8 sequences)
#   bash benchmarks/host_reads_gpu.sh lag    [OUT_DIR]  # step graphs, 50%: the hand-overs step / lag / layer, twice
#   bash benchmarks/host_reads_gpu.sh lag8   [OUT_DIR]  # batch 8, 50% and 25%: copy, step graphs with step / lag
#   bash benchmarks/host_reads_gpu.sh policies  [OUT_DIR]  # batch 1, 50% and 25%, lag: adaptive vs changepoint
#   bash benchmarks/host_reads_gpu.sh policies8 [OUT_DIR]  # the same at batch 8
#
# Each stage writes host_reads_*_h200.{json,png,log} into OUT_DIR (default benchmarks/results); each log
# starts with the commit, GPU and versions. Each command stops after STAGE_TIMEOUT seconds (default 540;
# a device call has 10 min).
# PYTHON picks the interpreter (default: python).
set -euo pipefail
stage=${1:?usage: host_reads_gpu.sh tests|probe|model|model8|lag|lag8|policies|policies8 [OUT_DIR]}
out=${2:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python}
limit=${STAGE_TIMEOUT:-540}  # seconds per command
. "$(dirname "$0")/gpu_stage.sh"
header=$(stage_header)

case "$stage" in
tests)
    run host_reads_tests_h200 timeout "$limit" "$py" -m pytest -q -p no:cacheprovider tests/test_cache_host_reads.py \
        tests/test_triton_gemv.py tests/test_cache_fast_path.py tests/test_expert_cache.py
    ;;
probe)
    run host_reads_h200 timeout "$limit" "$py" benchmarks/probe_host_reads.py --fractions 0.5 0.25 \
        --out "$out/host_reads_h200.json"
    ;;
model)
    run host_reads_model_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 \
        --fraction 0.5 0.25 --modes copy read graphs --resident-baseline --policy adaptive --new-tokens 32 \
        --out "$out/host_reads_model_h200.json"
    ;;
model8)
    run host_reads_model_b8_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 --batch 8 \
        --fraction 0.5 0.25 --modes copy graphs --resident-baseline --policy adaptive --new-tokens 32 \
        --out "$out/host_reads_model_b8_h200.json"
    ;;
lag)
    run host_reads_lag_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 \
        --fraction 0.5 --modes graphs graphs_lag graphs_layer graphs graphs_lag --resident-baseline --policy adaptive \
        --new-tokens 64 --out "$out/host_reads_lag_h200.json"
    ;;
lag8)
    run host_reads_lag_b8_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 --batch 8 \
        --fraction 0.5 0.25 --modes copy graphs graphs_lag --resident-baseline --policy adaptive --new-tokens 32 \
        --out "$out/host_reads_lag_b8_h200.json"
    ;;
policies)
    run host_reads_policies_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 \
        --fraction 0.5 0.25 --modes graphs_lag --policy adaptive changepoint --resident-baseline --new-tokens 64 \
        --out "$out/host_reads_policies_h200.json"
    ;;
policies8)
    run host_reads_policies_b8_h200 timeout "$limit" "$py" benchmarks/serve_offloaded.py --model switch-base-128 \
        --batch 8 --fraction 0.5 0.25 --modes graphs_lag --policy adaptive changepoint --resident-baseline \
        --new-tokens 32 --out "$out/host_reads_policies_b8_h200.json"
    ;;
*)
    echo "host_reads_gpu.sh: unknown stage $stage" >&2
    exit 2
    ;;
esac
exit $status
