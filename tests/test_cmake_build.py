"""The second build: csrc/ against libtorch with CMake, and its C++ test under ctest."""
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cuda_args():
    """What find_package(Torch) needs when torch is a CUDA wheel (DESIGN.md §3)."""
    if torch.version.cuda is None:
        return []
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("a CUDA build of torch needs a CUDA toolkit (nvcc) for find_package(Torch)")
    dry = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    toolkit = os.path.realpath(re.search(r"TOP=(\S+)", dry.stdout + dry.stderr).group(1))
    roots = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(torch.__file__))}  # venv or not
    nvrtc = sorted(p for root in roots for p in glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*")))
    nvrtc = [p for p in nvrtc if re.search(r"libnvrtc\.so\.\d+$", p)]
    args = [f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}"]
    return args + [f"-DCUDA_NVRTC_LIB={nvrtc[0]}"] if nvrtc else args


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), *generator,
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *_cuda_args()]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "100% tests passed" in out.stdout
