#!/usr/bin/env bash
# The multi-GPU measurements in one place, by stage, so that a scarce 2-, 4- or 8-GPU lease goes to
# measuring. Run from the repository root with the package importable (PYTHONPATH=$PWD):
#
#   bash benchmarks/multi_gpu.sh ep-exact  [OUT_DIR]  # N-rank expert parallelism, torch experts: outputs must equal one GPU's
#   bash benchmarks/multi_gpu.sh ep        [OUT_DIR]  # the same with the default (Triton) experts: timing, balanced vs round-robin
#   bash benchmarks/multi_gpu.sh placement [OUT_DIR]  # layer level: one process over 2 GPUs and 2-rank NCCL, Zipf alpha 1.6
#
# N is every visible GPU (CUDA_VISIBLE_DEVICES narrows it). Each stage writes <name>_h200xN.{json,png,log}
# into OUT_DIR (default benchmarks/results); each log starts with the commit, GPUs and versions.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0). Each stage stops after 540 s (a device call has 10 min).
# PYTHON picks the interpreter (default: python).
set -euo pipefail
stage=${1:?usage: multi_gpu.sh ep-exact|ep|placement [OUT_DIR]}
out=${2:-benchmarks/results}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
py=${PYTHON:-python}
n=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$n" -lt 2 ]; then
    echo "multi_gpu.sh: needs at least 2 CUDA GPUs, found $n" >&2
    exit 2
fi
. "$(dirname "$0")/gpu_stage.sh"
header=$(stage_header "${n}x ")

torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node "$n")
case "$stage" in
ep-exact)
    name=ep_scaling_torch_h200x$n
    run "$name" timeout 540 "${torchrun[@]}" benchmarks/bench_ep_scaling.py --backend torch --timeout 300 \
        --out "$out/$name.json"
    ;;
ep)
    name=ep_scaling_h200x$n
    run "$name" timeout 540 "${torchrun[@]}" benchmarks/bench_ep_scaling.py --timeout 300 --out "$out/$name.json"
    ;;
placement)
    name=placement_h200x${n}_alpha1.6
    run "$name" timeout 540 "$py" benchmarks/bench_placement.py --alpha 1.6 --tokens 4096 16384 --out "$out/$name.json"
    ;;
*)
    echo "multi_gpu.sh: unknown stage '$stage' (ep-exact, ep, placement)" >&2
    exit 2
    ;;
esac
tail -n 20 "$out/$name.log"
exit "$status"
