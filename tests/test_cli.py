import json
import shutil
import subprocess
import sys

import pytest


def test_main_job_runs_end_to_end_and_forgets(tmp_path):
    out = subprocess.run([sys.executable, "-m", "semu_fast", "unlearn", "--quiet", "--forget-class", "3",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "trainable:" in out.stdout and "conv2d" in out.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["original"]["forget_acc"] > 95
    assert summary["semu"]["forget_acc"] < 10 and summary["semu"]["retain_acc"] > 85
    assert (tmp_path / "out" / "adapters" / "adapters.safetensors").exists()
    assert list((tmp_path / "cache").glob("digits_cnn_seed0.pt"))


def test_console_script_is_installed():
    exe = shutil.which("semu-fast")
    if exe is None:
        pytest.skip("semu-fast is not on PATH (package not installed with pip)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "unlearn" in out.stdout


def test_bad_flag_value_is_rejected_with_the_flag_named():
    out = subprocess.run([sys.executable, "-m", "semu_fast", "unlearn", "--forget-class", "12"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--forget-class" in out.stderr
