#!/bin/bash
# GPU call E: step-graph decode A/B: previous commit vs HEAD vs HEAD without the fused router.
ROOT=$PWD
export NCCL_NVLS_ENABLE=0
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
for v in old head head_norouter; do
  d=${v%_norouter}; cd $ROOT/.carry/$d && ln -sfn "$ROOT/hf_moe_opt/assets" hf_moe_opt/assets
  env=""; [ "$v" = head_norouter ] && env="HF_MOE_OPT_FUSED_ROUTER=0"
  env $env PYTHONPATH=$PWD timeout 110 python benchmarks/bench_decode_graphs.py --models switch-base-128 --batches 1 8 --repeats 3 --out $OUT/dg_$v.json 2>&1 | grep -E "step_graphs|optimize" | sed "s/^/$v: /"
  stamp $v
done
