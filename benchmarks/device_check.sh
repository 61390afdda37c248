#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine (no network; torch, triton, nvcc, compute-sanitizer there).
#   OUT=/some/dir bash benchmarks/device_check.sh            # build for the GPU, device tests, sanitizers, benchmarks
#   DEVICE=cpu OUT=/tmp/x bash benchmarks/device_check.sh    # the same control flow on the CPU, tiny (CI runs this)
# Order: build, kernels present, the SVD cost calibration, the tests marked gpu (pytest -m gpu), compute-sanitizer
# memcheck and racecheck, the 7B prepare headline, the other benchmarks.
# BUDGET (seconds; default 480 on a GPU, 200 with DEVICE=cpu) bounds the whole run: every step's timeout is capped by
# what is left, and steps that no longer fit are reported as skipped. A failed build or a missing CUDA kernel stops
# the run. Five files under $OUT: device_check.log (the verdicts first, then every step's output), tests.txt,
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

# HOLD: seconds kept back for the 7B headline while the steps before it run (their caps sum past the budget).
HOLD=0
left() { echo $(( BUDGET - HOLD - ($(date +%s) - START) )); }

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
  $PY -c "import pytest; print('pytest', pytest.__version__)" || echo "pytest: not importable (the tests cannot run)"
  $PY -c "import torchvision" 2>/dev/null || echo "torchvision: not installed (bench_prepare skips its ResNet case)"
  $PY -c "import setuptools; print('setuptools', setuptools.__version__)" || echo "setuptools: missing (no build)"
  command -v ninja || echo "ninja: not on PATH (torch builds one file at a time)"
  if [ "$DEVICE" != cpu ]; then command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"; fi
} >> "$BODY" 2>&1
# One SVD cost calibration for the whole run (tests and benchmarks), measured in its own step below.
export SEMU_FAST_CACHE="$WORK/cache"
if [ "$DEVICE" = cpu ]; then HOLD=${HOLD_FOR_HEADLINE:-20}; else HOLD=${HOLD_FOR_HEADLINE:-150}; fi

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

# The SVD cost model's constants on this device, and what they choose for the 7B headline's shapes.
run "calibrate the SVD cost model" 60 "$BODY" $PY -c "
import torch, semu_fast as sf
from semu_fast.ops.svd import auto_plan
device = torch.device('$DEVICE')
print(sf.calibrate(device))
for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
    print(shape, auto_plan(shape, device, 0.95))"

# --- device tests: one pytest per file, so that a crash loses one file, not the rest --------------------------------
# Only the tests marked gpu (their CUDA cases and the Triton kernels; tests/conftest.py): the CPU cases are CI's.
i=0
pytest_step() {  # pytest_step NAME CAP [env VAR=VALUE ...] -- PYTEST ARGS...
  local name=$1 cap=$2 prefix=()
  shift 2
  while [ "$1" != -- ]; do prefix+=("$1"); shift; done
  shift
  i=$((i + 1))
  run "tests $name" "$cap" "$OUT/tests.txt" "${prefix[@]}" $PY -X faulthandler -m pytest -v -rfEs -p no:cacheprovider \
    --junitxml="$WORK/junit-$i.xml" "$@"
  # its summary line under its verdict ("3 failed, 40 passed in 12s"; none when pytest crashed)
  tail -n 3 "$OUT/tests.txt" | grep -E "^=+ .*(passed|failed|skipped|error).* in [0-9.]+s" | sed 's/^/    /' \
    >> "$VERDICTS"
}
if [ "$DEVICE" = cpu ]; then
  pytest_step "test_build.py -k schemas" 60 -- tests/test_build.py -k schemas
  pytest_step "test_accumulate.py -m gpu" 60 -- tests/test_accumulate.py -m gpu
else
  pytest_step test_build.py 90 -- tests/test_build.py
  # Every test file with tests marked gpu (tests/test_device_check.py checks that none is missing).
  GPU_TEST_FILES=(test_accumulate test_project_perpendicular test_gram_svd test_truncated_svd test_lowrank
                  test_gradients test_prepare test_unlearn test_llm)
  for file in "${GPU_TEST_FILES[@]}"; do
    pytest_step "$file.py -m gpu" 150 -- "tests/$file.py" -m gpu
  done
  # accumulate_ runs the Triton kernel on a GPU (it measured faster): its CUDA kernel is checked here, forced.
  pytest_step "test_accumulate.py -m gpu (forced CUDA kernel)" 90 env SEMU_FAST_IMPL=cuda -- \
    tests/test_accumulate.py -m gpu -k "not triton"
fi
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
grep -E "^(FAILED|ERROR)|Fatal Python error" "$OUT/tests.txt" | tail -40 >> "$VERDICTS"

# --- compute-sanitizer on one small call of every kernel (the CUDA accumulate_ forced, as above) --------------------
if [ "$DEVICE" = cpu ]; then
  run "kernels run (no sanitizer on the CPU)" 60 "$BODY" $PY benchmarks/sanitize_kernels.py --device cpu
else
  run "compute-sanitizer memcheck" 120 "$BODY" env SEMU_FAST_IMPL=cuda compute-sanitizer --tool memcheck \
    --error-exitcode 99 $PY benchmarks/sanitize_kernels.py --triton
  # racecheck instruments every shared-memory access: only our CUDA kernels (namespace semu_fast), where the option
  # exists; it did not finish in 60 s on everything torch launches too.
  FILTER=()
  HELP=$(compute-sanitizer --help 2>&1 || true)  # not piped into grep -q: under pipefail its early exit fails the test
  [[ $HELP == *--kernel-name* ]] && FILTER=(--kernel-name kns=semu_fast)
  run "compute-sanitizer racecheck" 120 "$BODY" env SEMU_FAST_IMPL=cuda compute-sanitizer --tool racecheck \
    "${FILTER[@]}" --error-exitcode 99 $PY benchmarks/sanitize_kernels.py
fi

# --- benchmarks: each prints its rows as it measures them and merges its tables into bench.json ----------------------
BENCH=(--device "$DEVICE" --json "$OUT/bench.json")
[ "$DEVICE" = cpu ] && BENCH+=(--quick)
# The large-model headline first: a Llama-2-7B shape, 64 x 512 tokens, every projection (goal: prepare < 60 s,
# <= 1.2x the floor).
if [ "$DEVICE" = cpu ]; then LLM=(); else LLM=(--size 7b); fi  # BENCH holds --quick on the CPU
HOLD=0
run bench_prepare_llm 200 "$BODY" $PY benchmarks/bench_prepare_llm.py "${LLM[@]}" --compare-svd "${BENCH[@]}"
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

# --- what the GPU measured -----------------------------------------------------------------------------------------
if [ -f "$OUT/bench.json" ]; then
  {
    echo "## Device check on $($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import common, torch
print(common.device_name(torch.device('$DEVICE')))"), $(date -u +%Y-%m-%d)"
    echo
    $PY benchmarks/common.py markdown "$OUT/bench.json"
  } > "$OUT/RESULTS_gpu.md" 2>> "$BODY"
fi
verdict "DONE: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'some steps FAILED or were skipped') in $(( $(date +%s) - START ))s"
exit $FAILED
