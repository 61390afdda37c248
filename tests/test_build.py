"""The build and the backend choice: what `pip install` produced, and that the library works without it."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import semu_fast as sf
from conftest import requires_cuda
from semu_fast.ops import _registry
from semu_fast.ops import accumulate, project, svd

CPP_OPS = ("accumulate_", "project_perpendicular_", "gram_svd")


def test_extension_is_built_and_serves_cpu():
    ext, why = _registry.extension()
    assert ext is not None, why
    assert sf.backends()["accumulate_"]["CPU"]["chosen"] == "cpp"


def test_python_schemas_equal_the_cpp_schemas():
    for name, schema in [("accumulate_", accumulate.SCHEMA), ("project_perpendicular_", project.SCHEMA),
                         ("gram_svd", svd.GRAM_SVD_SCHEMA)]:
        assert str(getattr(torch.ops.semu_fast, name).default._schema) == f"semu_fast::{schema}"


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("SEMU_FAST_CUDA") == "0", reason="no CUDA toolkit or CPU-only torch")
def test_cuda_kernels_were_compiled_into_the_extension():
    for op in CPP_OPS:
        assert _registry.has_cpp_kernel(op, "CUDA"), op
        choice = sf.backends()[op]["CUDA"]
        # accumulate_'s Triton kernel measured faster on a GPU: it comes first wherever Triton can run.
        assert choice["chosen"] == "cuda" or (op == "accumulate_" and choice["chosen"] == "triton"
                                              and "measured slower" in choice["reasons"]["cuda"]), choice


@requires_cuda
def test_the_extension_serves_the_cpp_ops_on_this_gpu():
    """On a GPU machine the three C++ ops are served by a compiled kernel (CUDA, or for accumulate_ the Triton one
    that measured faster), never the torch fallback, and the extension was built for this GPU's architecture."""
    expected = {"accumulate_": "triton", "project_perpendicular_": "cuda", "gram_svd": "cuda"}
    for op in CPP_OPS:
        assert sf.backends()[op]["CUDA"]["chosen"] == expected[op], sf.backends()[op]
    info = _registry.build_info()
    major, minor = torch.cuda.get_device_capability()
    assert info["with_cuda"] and f"sm_{major}{minor}" in info["cuda_archs"], info


def test_every_backend_choice_states_why_the_others_were_not_taken():
    for op, devices in sf.backends().items():
        for device, info in devices.items():
            assert info["chosen"] in _registry.BACKENDS
            assert all(isinstance(r, str) and r for r in info["reasons"].values()), (op, device)


def test_library_works_without_the_extension():
    script = (
        "import sys; sys.modules['semu_fast._C'] = None\n"
        "import torch, semu_fast as sf\n"
        "a = torch.zeros(4); sf.ops.accumulate_([a], [torch.ones(4, dtype=torch.float16)])\n"
        "assert torch.equal(a, torch.ones(4))\n"
        "info = sf.backends()['accumulate_']['CPU']\n"
        "assert info['chosen'] == 'torch' and 'not built' in info['reasons']['cpp'], info\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_info_command_prints_every_op():
    out = subprocess.run([sys.executable, "-m", "semu_fast.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for op, devices in sf.backends().items():
        for device, choice in devices.items():
            assert f"{op:24s} {device:5s} -> {choice['chosen']}" in out.stdout


def test_triton_kernels_folder_is_not_a_top_level_package():
    # What an install provides: away from the checkout and without PYTHONPATH (the device check puts the checkout
    # there, which makes its folders importable without any install being at fault).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import triton_kernels"], capture_output=True, text=True,
                         cwd="/", env=env, timeout=300)
    if out.returncode == 0:  # some other installed package may own the name; it must not be ours
        where = subprocess.run([sys.executable, "-c", "import triton_kernels; print(triton_kernels.__file__)"],
                               capture_output=True, text=True, cwd="/", env=env).stdout
        assert "semu" not in where and not where.startswith(os.path.dirname(os.path.dirname(__file__)))


def test_unknown_forced_backend_warns_and_imports():
    script = "import warnings, semu_fast as sf; print(sf.backends()['accumulate_']['CPU']['chosen'])"
    out = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SEMU_FAST_IMPL": "fortran"})
    assert out.returncode == 0, out.stderr
    assert "SEMU_FAST_IMPL must be one of" in out.stderr and out.stdout.strip() == "cpp"


def test_build_info_reports_how_the_extension_was_built():
    from semu_fast import _C

    info = _C.build_info()
    assert set(info) == {"with_cuda", "cuda_archs", "cuda_version", "compiler", "torch_version"}
    assert isinstance(info["with_cuda"], bool)
    assert info["with_cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key("semu_fast::accumulate_", "CUDA")
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    if info["with_cuda"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in info["cuda_archs"])
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None
    assert isinstance(info["compiler"], str) and re.match(r"(gcc|clang|msvc) \d", info["compiler"])
    assert info["torch_version"] == torch.__version__.split("+")[0]

