# Sourced by the GPU stage scripts (multi_gpu.sh, host_reads_gpu.sh): the header every log starts with
# and run(). Needs $py (the interpreter) and $out (the log folder).

# stage_header [PREFIX]: "# commit C; PREFIX<GPU> torch V triton V transformers V". HF_MOE_OPT_COMMIT names
# the commit where git cannot (a copied working tree whose .git is older).
stage_header() {
    local commit=${HF_MOE_OPT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .carry/commit.txt 2>/dev/null || echo unknown)}
    echo "# commit $commit; ${1:-}$("$py" -c 'import torch,triton,transformers;print(torch.cuda.get_device_name(),"torch",torch.__version__,"triton",triton.__version__,"transformers",transformers.__version__)')"
}

status=0
run() {  # run NAME COMMAND...: log with $header and the command line; the exit status in $status
    local name=$1
    shift
    { echo "$header"; echo "# $*"; } > "$out/$name.log"
    "$@" >> "$out/$name.log" 2>&1 || status=$?
}
