#!/usr/bin/env bash
# Persistent launches on one GPU: kernel tests, tuning with persistent candidates (merged into a copy
# of the shipped table), then the layer benchmark on that table. Logs and JSON in OUT_DIR.
#
#   bash benchmarks/persistent_gpu.sh OUT_DIR [tests] [tune] [layer]
#
# STAGE_TIMEOUT (s) bounds each tuning point; TUNE_POINTS lists "E,D,F,k:tokens" points to tune (each
# against the table's entry, timed in the same run); FLATTEN the flatten values tried ("0 1"), PERSISTENT
# the programs per SM ("0 1 2"), TAILS the tail tile heights ("0 64"); TESTS
# the test files, TESTS_K a -k selection; LAYER_SHAPES the layer benchmark's shapes.
set -u
out=${1:?usage: persistent_gpu.sh OUT_DIR [tests] [tune] [layer]}
shift
stages=${*:-tests tune layer}
py=${PYTHON:-python}
mkdir -p "$out/cfg"
source "$(dirname "$0")/gpu_stage.sh"
header=$(stage_header)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$out/cfg/NVIDIA_H200.json" ] || cp hf_moe_opt/kernels/configs/NVIDIA_H200.json "$out/cfg/"
points=${TUNE_POINTS:-128,768,3072,1:16384 128,1024,4096,1:16384 8,768,3072,1:4096 128,2048,8192,2:16384 8,768,3072,1:16384}
for stage in $stages; do
    case $stage in
        tests) run persistent_tests "$py" -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_triton_kernels.py} \
            ${TESTS_K:+-k "$TESTS_K"} ;;
        tune)
            { echo "$header"; echo "# tune_triton.py --out cfg/NVIDIA_H200.json (a copy of the shipped table), per point:"; } \
                > "$out/persistent_tune.log"
            for point in $points; do
                echo "== ${point%%:*} tokens ${point##*:}" >> "$out/persistent_tune.log"
                timeout "${STAGE_TIMEOUT:-150}" "$py" benchmarks/tune_triton.py --shape "${point%%:*}" \
                    --tokens "${point##*:}" --block-m 128 --num-warps 8 --tma only --tail-m ${TAILS:-0} \
                    --persistent ${PERSISTENT:-0 1 2} --flatten ${FLATTEN:-1} --precompile 14 --out "$out/cfg/NVIDIA_H200.json" \
                    >> "$out/persistent_tune.log" 2>&1 || { status=$?; echo "rc=$status" >> "$out/persistent_tune.log"; }
            done ;;
        layer)
            HF_MOE_OPT_TRITON_CONFIGS=$out/cfg run persistent_layer "$py" benchmarks/bench_layer.py --tokens 4096 16384 \
                ${LAYER_SHAPES:+--shapes $LAYER_SHAPES} --out "$out/persistent_layer_h200.json" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
exit $status
