#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine (no network; torch, triton, nvcc, compute-sanitizer there).
#   OUT=/some/dir bash benchmarks/device_check.sh            # build for the GPU, device tests, sanitizers, benchmarks
#   DEVICE=cpu OUT=/tmp/x bash benchmarks/device_check.sh    # the same control flow on the CPU, tiny (CI runs this)
# BUDGET (seconds; default 480 on a GPU, 200 with DEVICE=cpu) bounds the whole run: every step's timeout is capped by
# what is left, and steps that no longer fit are reported as skipped. A failed build or a missing CUDA kernel stops
# the run. At most 5 files under $OUT: device_check.log (the verdicts first, then every step's output), tests.txt,
# junit.xml, bench.json (every benchmark's tables) and RESULTS_gpu.md (the same tables, ready for RESULTS.md).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then BUDGET=${BUDGET:-200}; else BUDGET=${BUDGET:-480}; fi
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$(date +%s)
WORK=$(mktemp -d)
BODY="$WORK/body.log"
VERDICTS="$WORK/verdicts"
FAILED=0
: > "$BODY"; : > "$VERDICTS"; : > "$OUT/tests.txt"; rm -f "$OUT/bench.json"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

verdict() {
  echo "$*" | tee -a "$VERDICTS"
  echo "$*" >> "$BODY"
}

finish() {
  {
    echo "# device_check DEVICE=$DEVICE budget ${BUDGET}s used $(( $(date +%s) - START ))s, $(date -u)"
    cat "$VERDICTS"
    echo
    echo "# --- every step's output ---"
    cat "$BODY"
  } > "$OUT/device_check.log"
  rm -rf "$WORK"
  [ -n "${LINKED:-}" ] && rm -f "$LINKED"
}
trap finish EXIT

# run NAME CAP LOG CMD...: CMD under a timeout of min(CAP, what is left), its output appended to LOG; one verdict.
run() {
  local name=$1 cap=$2 log=$3 t rc started
  shift 3
  t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 10 )); then
    verdict "SKIPPED $name: the budget is spent"
    FAILED=1  # an incomplete check is not a passed one
    return 124
  fi
  echo "## $name (timeout ${t}s): $*" >> "$log"
  started=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) verdict "OK $name ($(( $(date +%s) - started ))s)" ;;
    124|137) verdict "TIMEOUT $name after $(( $(date +%s) - started ))s"; FAILED=1 ;;
    *) verdict "FAILED $name: exit $rc after $(( $(date +%s) - started ))s"; FAILED=1 ;;
  esac
  return $rc
}

stop() {
  verdict "STOPPED: $*"
  exit 1
}

# --- the machine -------------------------------------------------------------------------------------------------
{
  echo "## machine"
  if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader; fi
  nproc
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
} >> "$BODY" 2>&1

# --- build and check the extension -------------------------------------------------------------------------------
if [ "$DEVICE" = cpu ]; then
  $PY -c "import semu_fast._C" >> "$BODY" 2>&1 || stop "DEVICE=cpu uses the installed extension, and semu_fast._C does not import (run README's set-up)"
  verdict "SKIPPED build: DEVICE=cpu uses the installed extension"
else
  # In place, without dependency resolution (there is no network); CUDA forced: a CPU-only build must fail loudly.
  # The system compiler when there is one: on the lent H200 machine the default g++ (/opt/gcc) produced an extension
  # whose every C++ error (a failed argument check) crashed Python instead of raising.
  if [ -x /usr/bin/g++ ]; then export CXX=${CXX:-/usr/bin/g++} CC=${CC:-/usr/bin/gcc}; fi
  run build 300 "$BODY" env SEMU_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" $PY setup.py build_ext --inplace || stop "BUILD FAILED (see the build step below)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# A checkout holds the Triton kernels in triton_kernels/; an install maps them to semu_fast.triton_kernels.
if ! $PY -c "import semu_fast.triton_kernels" 2>/dev/null; then
  ln -sfn ../triton_kernels semu_fast/triton_kernels
  LINKED=semu_fast/triton_kernels  # removed again when the run ends
fi
$PY -m semu_fast.info >> "$BODY" 2>&1
if [ "$DEVICE" != cpu ]; then
  run "CUDA kernels present" 60 "$BODY" $PY -c "
import torch, semu_fast as sf
from semu_fast.ops import _registry
missing = [op for op in ('accumulate_', 'project_perpendicular_', 'gram_svd')
           if not _registry.has_cpp_kernel(op, 'CUDA') or sf.backends()[op]['CUDA']['chosen'] == 'torch']
assert not missing, f'no compiled kernel serves {missing}: {sf.backends()}'
info, (major, minor) = _registry.build_info(), torch.cuda.get_device_capability()
assert f'sm_{major}{minor}' in info.get('cuda_archs', []), f'built for {info}, this GPU is sm_{major}{minor}'
print('CUDA kernels registered;', info)" || stop "MISSING CUDA KERNEL (the ops would silently fall back to torch)"
fi

# --- device tests: one pytest per file, so that a crash loses one file, not the rest --------------------------------
if [ "$DEVICE" = cpu ]; then
  TEST_FILES=("tests/test_build.py -k schemas")
else
  TEST_FILES=(tests/test_build.py tests/test_accumulate.py tests/test_project_perpendicular.py tests/test_gram_svd.py
              tests/test_truncated_svd.py tests/test_lowrank.py tests/test_prepare.py)
fi
i=0
for spec in "${TEST_FILES[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # spec is a file plus its pytest options
  run "tests ${spec}" 120 "$OUT/tests.txt" $PY -X faulthandler -m pytest -v -rfEs -p no:cacheprovider \
    --junitxml="$WORK/junit-$i.xml" $spec
done
$PY - "$OUT/junit.xml" "$WORK"/junit-*.xml >> "$BODY" 2>&1 <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:  # a crashed pytest leaves none
        print(f"junit: {path}: {err}")
        continue
    merged.extend(root.iter("testsuite"))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
PYEOF
grep -E "^(FAILED|ERROR)|passed|failed|Fatal Python error" "$OUT/tests.txt" | tail -40 >> "$VERDICTS"

# --- compute-sanitizer on one small call of every kernel -----------------------------------------------------------
if [ "$DEVICE" = cpu ]; then
  run "kernels run (no sanitizer on the CPU)" 60 "$BODY" $PY benchmarks/sanitize_kernels.py --device cpu
else
  run "compute-sanitizer memcheck" 120 "$BODY" compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY benchmarks/sanitize_kernels.py --triton
fi

# --- benchmarks: each prints its rows as it measures them and merges its tables into bench.json ----------------------
BENCH=(--device "$DEVICE" --json "$OUT/bench.json")
[ "$DEVICE" = cpu ] && BENCH+=(--quick)
run bench_accumulate 60 "$BODY" $PY benchmarks/bench_accumulate.py "${BENCH[@]}"
# accumulate_'s CUDA kernel sits behind the Triton one, which measured faster: keep measuring both.
[ "$DEVICE" != cpu ] && run "bench_accumulate (forced CUDA kernel)" 40 "$BODY" env SEMU_FAST_IMPL=cuda \
  $PY benchmarks/bench_accumulate.py "${BENCH[@]}"
run bench_project_perpendicular 40 "$BODY" $PY benchmarks/bench_project_perpendicular.py "${BENCH[@]}"
run bench_gram_svd 40 "$BODY" $PY benchmarks/bench_gram_svd.py "${BENCH[@]}"
run bench_truncated_svd 60 "$BODY" $PY benchmarks/bench_truncated_svd.py "${BENCH[@]}"
if [ "$DEVICE" = cpu ]; then MEMORY=(); else MEMORY=(--memory); fi  # --memory spawns a process per case on a CPU
run bench_lowrank 90 "$BODY" $PY benchmarks/bench_lowrank.py "${MEMORY[@]}" "${BENCH[@]}"
# The Triton dual_matmul is gated behind cuBLAS until it measures faster: this is that measurement (values checked).
run "bench_lowrank (forced Triton)" 90 "$BODY" env SEMU_FAST_IMPL=triton $PY benchmarks/bench_lowrank.py --layer linear \
  "${BENCH[@]}"
run bench_prepare 90 "$BODY" $PY benchmarks/bench_prepare.py "${BENCH[@]}"
# The large-model headline: a Llama-2-7B shape, 64 x 512 tokens, every projection (goal: prepare < 60 s, <= 1.2x floor).
if [ "$DEVICE" = cpu ]; then LLM=(--quick); else LLM=(--size 7b --compare-svd); fi
run bench_prepare_llm 180 "$BODY" $PY benchmarks/bench_prepare_llm.py "${LLM[@]}" "${BENCH[@]}"

# --- what the GPU measured, and racecheck with whatever time is left ------------------------------------------------
if [ -f "$OUT/bench.json" ]; then
  {
    echo "## Device check on $($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import common, torch
print(common.device_name(torch.device('$DEVICE')))"), $(date -u +%Y-%m-%d)"
    echo
    $PY benchmarks/common.py markdown "$OUT/bench.json"
  } > "$OUT/RESULTS_gpu.md" 2>> "$BODY"
fi
if [ "$DEVICE" != cpu ]; then
  run "compute-sanitizer racecheck" 150 "$BODY" compute-sanitizer --tool racecheck --error-exitcode 99 \
    $PY benchmarks/sanitize_kernels.py
fi
verdict "DONE: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'some steps FAILED or were skipped') in $(( $(date +%s) - START ))s"
exit $FAILED
