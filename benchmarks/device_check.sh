#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network; torch, triton, nvcc preinstalled): build the extension for
# sm_90, run the tests (CUDA ones included), run every GPU benchmark, leave a log, tables and JSON under $OUT.
#   usage (repository root): OUT=/some/dir bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
log="$OUT/device_check.log"
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$log" 2>&1

# Build: in place, no dependency resolution (there is no network).
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 SEMU_FAST_CUDA=1 MAX_JOBS=16 python setup.py build_ext --inplace >> "$log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start ))s" | tee -a "$log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# semu_fast.triton_kernels lives in triton_kernels/ in a checkout: link it where an install would put it.
[ -e semu_fast/triton_kernels ] || ln -s ../triton_kernels semu_fast/triton_kernels
python -m semu_fast.info | tee -a "$log"

timeout 300 python -m pytest -q tests/test_accumulate.py tests/test_gram_svd.py tests/test_lowrank.py \
  tests/test_truncated_svd.py tests/test_project_perpendicular.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" | tee -a "$log"; tail -3 "$OUT/tests.txt" | tee -a "$log"

for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  timeout 120 python "$bench" --device cuda --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$?" | tee -a "$log"; cat "$OUT/$name.txt" >> "$log"
done
# The Triton adapter kernels sit behind cuBLAS until measured faster: this run is that measurement.
SEMU_FAST_IMPL=triton timeout 150 python benchmarks/bench_adapter.py --device cuda --memory \
  --json "$OUT/bench_adapter_triton.json" > "$OUT/bench_adapter_triton.txt" 2>&1
echo "bench_adapter (forced triton) rc=$?" | tee -a "$log"; cat "$OUT/bench_adapter_triton.txt" >> "$log"
echo "results in $OUT"
