#!/bin/bash
# The CUDA check, for a machine with a GPU: the CUDA tests, then `fxstream bench` on CUDA.
# Run from the repository root: `bash examples/cuda_check.sh`. Logs go to $OUT (default
# /tmp/fxstream-cuda), one file per step; each step has its own time limit.
set -u
OUT=${OUT:-/tmp/fxstream-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}
BENCH="$PY -m fxstream.cli bench --device cuda --warmup 1"
step env 30 bash -c "$PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name())'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"
step cuda_tests 60 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
step bench_r18_4096 90 $BENCH torchvision.models:resnet18 --input 1x3x4096x4096 --budget 1.75GiB --variants full,streamed --repeat 2
step bench_r18_4096_tuned 60 $BENCH torchvision.models:resnet18 --input 1x3x4096x4096 --budget 1.75GiB --variants streamed --repeat 1 --cudnn-benchmark
step bench_r34_8192 40 $BENCH torchvision.models:resnet34 --input 1x3x8192x8192 --budget 8GiB --variants streamed --repeat 1
step bench_r18_4096_offload 45 $BENCH torchvision.models:resnet18 --input 1x3x4096x4096 --budget 1.75GiB --variants streamed --repeat 1 --offload
step bench_r18_16384 45 $BENCH torchvision.models:resnet18 --input 1x3x16384x16384 --budget 20GiB --variants streamed --repeat 1
step suite ${SUITE_LIMIT:-90} $PY -m pytest -q -p no:cacheprovider -n 12 tests
