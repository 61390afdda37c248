"""benchmarks/device_check.sh's control flow, run here on the CPU (DEVICE=cpu), so that the first run on a lent GPU
machine is not also the script's first run: it finishes inside its budget, writes at most 6 files, puts the
verdicts first, and fills bench.json and RESULTS_gpu.md."""
import json
import os
import subprocess
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
    for step in ("tests", "bench_accumulate", "bench_project_perpendicular", "bench_gram_svd", "bench_truncated_svd",
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
