#!/usr/bin/env bash
# Every GPU check of the project in one run (issue 6, "GPU path"): the CUDA tests, the HVP/gradient and
# whole-analysis ratios on the GPU, and the README's command with --device cuda. Logs go to $OUT (default
# gpu_out/). Needs a CUDA build of torch and the project importable (pip install -e . or PYTHONPATH=.).
#
#   OUT=gpu_out bash benchmarks/run_gpu.sh
#
# Each step has its own time limit and the script goes on after a failure, so one broken step does not
# cost the others; the last line of each log says how it ended.
set -u
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "exit $rc after $((SECONDS - t0)) s" >>"$OUT/$name.txt"
    tail -n 40 "$OUT/$name.txt"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
$PY -c 'import torch, transformers, datasets; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), transformers.__version__, datasets.__version__)'"
step test_cuda 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench_hvp_cuda 200 "$PY" benchmarks/bench_hvp.py --device cuda --repeats 5
step bench_analysis_cuda 300 "$PY" benchmarks/bench_analysis.py --device cuda --quick --configs small medium
step analyze_sample_cuda 120 bash -c "time $PY -m commute_cli analyze sample_checkpoints/ --device cuda \
--out /tmp/sample --quiet && cp /tmp/sample/results.csv $OUT/sample_results_cuda.csv"
