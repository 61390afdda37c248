"""benchmarks/device_check.sh's control flow, run here on the CPU (DEVICE=cpu), so that the first run on a lent GPU
machine is not also the script's first run: it finishes inside its budget, writes its five files, puts the
verdicts first, and fills bench.json and RESULTS_gpu.md."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    # ~115 s alone on 2 cores; the budget leaves room for a machine shared with other jobs.
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "BUDGET": "360", "PYTHON": "python"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=520)
    log = (out / "device_check.log").read_text()
    assert done.returncode == 0, log[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["RESULTS_gpu.md", "bench.json", "device_check.log", "junit.xml", "tests.txt"]
    verdicts = log.split("# --- every step's output ---")[0]
    assert "DONE: every step passed" in verdicts and "FAILED" not in verdicts
    for step in ("calibrate the SVD cost model", "tests test_build.py", "tests test_accumulate.py -m gpu",
                 "bench_accumulate", "bench_project_perpendicular", "bench_gram_svd", "bench_truncated_svd",
                 "bench_lowrank", "bench_prepare", "bench_prepare_llm"):
        assert f"OK {step}" in verdicts, step
    tables = json.loads((out / "bench.json").read_text())["tables"]
    assert {t["benchmark"] for t in tables} >= {"bench_accumulate", "bench_project_perpendicular", "bench_gram_svd",
                                                "bench_truncated_svd", "bench_lowrank", "bench_prepare",
                                                "bench_prepare_llm"}
    assert all(t["rows"] for t in tables)
    assert (out / "RESULTS_gpu.md").read_text().count("### ") == len(tables)
    assert "testsuite" in (out / "junit.xml").read_text()


def test_device_check_stops_loudly_when_the_extension_is_missing(tmp_path):
    out = tmp_path / "out"
    # A sitecustomize that hides semu_fast._C: the script must stop before any test or benchmark.
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text("import sys\nsys.modules['semu_fast._C'] = None\n")
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "BUDGET": "60", "PYTHON": "python",
           "PYTHONPATH": str(tmp_path / "block")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    log = (out / "device_check.log").read_text()
    assert done.returncode != 0
    assert "STOPPED" in log.split("# --- every step's output ---")[0]
    assert not (out / "bench.json").exists()


def _gpu_test_files_of_the_script() -> list:
    script = (ROOT / "benchmarks" / "device_check.sh").read_text()
    return re.search(r"GPU_TEST_FILES=\(([^)]*)\)", script)[1].split()


def _collect(*args):
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_gpu_mark_selects_every_cuda_case_and_the_script_runs_every_file_that_has_one():
    """The device check runs `pytest -m gpu` on GPU_TEST_FILES (and test_build.py whole): that must be every test
    that runs on CUDA (a "cuda" case, a requires_cuda test, a Triton kernel test) in the whole suite, and none of
    the CPU cases CI already runs."""
    selected = _collect("-m", "gpu", "tests")
    files = {test.split("::")[0].removeprefix("tests/").removesuffix(".py") for test in selected}
    assert files - {"test_build"} <= set(_gpu_test_files_of_the_script()), files
    in_script = [f"tests/{name}.py" for name in _gpu_test_files_of_the_script()]
    cuda_cases = [test for test in _collect(*in_script) if re.search(r"[\[-]cuda[\]-]", test)]
    assert cuda_cases and set(cuda_cases) <= set(selected)
    assert not [test for test in selected if re.search(r"[\[-]cpu[\]-]", test)]
    for name in ("test_accumulate_tensor_longer_than_one_chunk_table_bit_exact", "test_prepare_on_cuda_matches_cpu",
                 "test_triton_kernel_matches_reference", "test_triton_dual_matmul_matches_reference",
                 "test_triton_conv_delta_kernels_match_reference"):
        assert any(f"::{name}" in test for test in selected), name


def _run_cuda_branch_with_stubs(tmp_path, pytest_seconds=0, **env):
    """device_check.sh with DEVICE=cuda and stand-ins that record their calls: python (each pytest taking
    pytest_seconds), nvidia-smi and compute-sanitizer. Returns (process, device_check.log, out folder, calls)."""
    bin_dir, calls, out = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "out"
    bin_dir.mkdir()
    stubs = {"fakepy": f'echo "PY $*" >> {calls}; case "$*" in *pytest*) sleep {pytest_seconds};; esac',
             "nvidia-smi": 'echo "NVIDIA H200, 143771 MiB, 570.00, 9.0"',
             # a long help with the option early: a reader that stops at the match must not lose it
             "compute-sanitizer": f'if [ "$1" = --help ]; then echo "  --kernel-name <name>"; '
                                  f'exec seq 1 1000000; fi; echo "SAN $*" >> {calls}'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "DEVICE": "cuda", "OUT": str(out), "PYTHON": str(bin_dir / "fakepy"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, (out / "device_check.log").read_text(), out, calls


def test_the_cuda_branch_runs_every_step_in_order_with_stub_tools(tmp_path):
    """The DEVICE=cuda branch, which only a lent GPU machine runs for real, with stand-ins for python, nvidia-smi
    and compute-sanitizer that record their calls: every step is reached in the intended order, with the options
    that matter (the CUDA build, -m gpu on every GPU test file, the forced CUDA accumulate_, racecheck's kernel
    filter read from a long --help)."""
    done, log, out, calls = _run_cuda_branch_with_stubs(tmp_path)
    assert done.returncode == 0, log[-3000:]
    steps = [line[3:].rsplit(" (", 1)[0] for line in log.split("# --- every step's output ---")[0].splitlines()
             if line.startswith("OK ")]
    gpu_files = [f"tests {name}.py -m gpu" for name in _gpu_test_files_of_the_script()]
    assert steps == ["build", "CUDA kernels present", "calibrate the SVD cost model", "tests test_build.py",
                     *gpu_files, "tests test_accumulate.py -m gpu (forced CUDA kernel)", "compute-sanitizer memcheck",
                     "compute-sanitizer racecheck", "bench_prepare_llm", "bench_accumulate",
                     "bench_accumulate (forced CUDA kernel)", "bench_project_perpendicular", "bench_gram_svd",
                     "bench_truncated_svd", "bench_lowrank", "bench_lowrank (forced Triton)", "bench_prepare"]
    headers = log + (out / "tests.txt").read_text()
    assert "env SEMU_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0" in headers
    assert re.search(r"\(forced CUDA kernel\) \(timeout \d+s\): env SEMU_FAST_IMPL=cuda .* -m gpu -k not triton",
                     headers)
    recorded = calls.read_text()
    assert "SAN --tool racecheck --kernel-name kns=semu_fast" in recorded
    assert "bench_prepare_llm.py --size 7b --compare-svd --device cuda" in recorded


def test_the_headline_keeps_its_share_of_the_budget_when_the_tests_run_long(tmp_path):
    # 30 s in all, 15 held back: tests of 3 s each exhaust the rest, the later ones and the sanitizers are skipped
    # (and the run fails), but the 7B headline still runs.
    done, log, _, _ = _run_cuda_branch_with_stubs(tmp_path, pytest_seconds=3, BUDGET="30", HOLD_FOR_HEADLINE="15")
    verdicts = log.split("# --- every step's output ---")[0]
    assert done.returncode == 1 and "SKIPPED tests test_llm.py -m gpu: the budget is spent" in verdicts
    assert "SKIPPED compute-sanitizer memcheck" in verdicts and "OK bench_prepare_llm" in verdicts
