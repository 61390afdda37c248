"""Builds semu_fast._C: the C++ CPU kernels always, the CUDA kernels when a toolkit and a CUDA build of torch are
present. Switches: SEMU_FAST_CUDA=0/1 (skip or force the CUDA part), TORCH_CUDA_ARCH_LIST (default "9.0"),
CUDA_HOME (the toolkit that holds nvcc; found from nvcc itself when unset), MAX_JOBS (parallel compile jobs)."""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup


def _toolkit_from_nvcc():
    """The toolkit root, asked of nvcc: on some machines nvcc on PATH is a wrapper script outside the toolkit."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return os.path.realpath(match.group(1)) if match else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so it must be settled first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    root = _toolkit_from_nvcc()
    if root:
        os.environ["CUDA_HOME"] = root
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("SEMU_FAST_CUDA")
    able = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not able:
        raise RuntimeError(f"SEMU_FAST_CUDA=1 but the CUDA build is impossible: CUDA_HOME={CUDA_HOME}, "
                           f"torch.version.cuda={torch.version.cuda} (needs nvcc and a CUDA build of torch)")
    return able if flag is None else flag == "1"


def _wheel_cuda_includes():
    """The CUDA wheels' headers (cuBLAS, cuSPARSE...), which ATen/cuda/CUDAContext.h needs and a bare toolkit
    may lack. They sit next to torch (in a virtual environment that reuses the system's packages, that is not the
    environment's own site-packages)."""
    roots = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(torch.__file__))}
    return sorted({p for root in roots for p in glob.glob(os.path.join(root, "nvidia", "*", "include"))
                   if os.path.isdir(p)})


def _cuda_archs():
    """TORCH_CUDA_ARCH_LIST ("9.0", "8.0;9.0a", "8.6+PTX") as the targets nvcc builds: sm_XY, and compute_XY (PTX)
    for +PTX entries; build_info() reports them."""
    archs = []
    for major, minor, suffix, ptx in re.findall(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?",
                                                os.environ["TORCH_CUDA_ARCH_LIST"]):
        archs.append(f"sm_{major}{minor}{suffix}")
        if ptx:
            archs.append(f"compute_{major}{minor}{suffix}")
    return archs


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-DSEMU_FAST_PYTHON_MODULE"]
    # at::parallel_for runs serially unless the extension itself is compiled with OpenMP (ATen/Parallel-inl.h
    # checks _OPENMP); the libgomp it links is the one torch has already loaded (same soname).
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not _want_cuda():
        print("semu_fast: building the C++ CPU kernels only")
        return CppExtension("semu_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"semu_fast: building C++ and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DSEMU_FAST_PYTHON_MODULE"]
    # A bare comma-separated token list (no quotes to survive the shell); csrc/module.cpp turns it into a string.
    archs = f"-DSEMU_FAST_CUDA_ARCHS={','.join(_cuda_archs())}"
    return CUDAExtension("semu_fast._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                         include_dirs=_wheel_cuda_includes(),
                         extra_compile_args={"cxx": cxx + ["-DSEMU_FAST_WITH_CUDA", archs],
                                             "nvcc": nvcc + ["-DSEMU_FAST_WITH_CUDA"]},
                         extra_link_args=link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
