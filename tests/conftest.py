"""Shared test setup: Triton runs under its interpreter where there is no GPU, the devices every op test covers
(CUDA cases are collected everywhere and skipped without a GPU), and one tolerance table per dtype."""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: it decides at @triton.jit time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The SVD cost calibration (and any other cache) goes to a folder of this test session, not the user's home: the
# tests must not depend on, or write, a developer's cached measurements.
if "SEMU_FAST_CACHE" not in os.environ:
    os.environ["SEMU_FAST_CACHE"] = tempfile.mkdtemp(prefix="semu_fast_test_cache_")
    atexit.register(shutil.rmtree, os.environ["SEMU_FAST_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

from semu_fast.ops import svd_plan  # noqa: E402

# truncated_svd(method="auto") and prepare plan their SVD path from costs measured on the device; measured on a busy
# CPU (the suite's own processes, a shared CI runner) they swing by 40x, and so would the paths the tests expect. The
# CPU's constants are fixed here, at what an idle 2-core runner measures per unit of work; the calibration tests
# measure with their own cache. A GPU's are measured: its plan is what the device check wants to see.
svd_plan._COSTS[svd_plan._device_key(torch.device("cpu"))] = svd_plan.Costs(gemm=1e-11, thin_gemm=2e-11, eigh=1e-10,
                                                                              svd=1e-10)

# Every op is checked against float64 references: on a GPU, float32 convolutions must not run in TF32 (cuDNN's
# default) nor half-precision GEMMs reduce in half precision, or the tolerances would measure those modes instead.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

NEEDS_CUDA = "needs a CUDA device"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_collection_modifyitems(items):
    """Mark "gpu" every test that runs on a CUDA device when there is one (a "cuda" case of DEVICES, or
    requires_cuda); the Triton tests carry the mark themselves. The device check runs `-m gpu`: its time is short."""
    for item in items:
        if any(mark.kwargs.get("reason") == NEEDS_CUDA for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)

# Floor of the allowed error per dtype, on top of the "twice the plain PyTorch error" rule (flash-attention's).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _triton_version() -> tuple:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def interpreter_ok() -> str:
    """"" when Triton's CPU interpreter can run our kernels here, else why not. (triton 3.6 with numpy >= 2.4 fails
    on loops bounded at run time, e.g. range(0, K, BK): "only 0-dimensional arrays can be converted to Python
    scalars"; triton 3.8 is fine.)"""
    try:
        version = _triton_version()
    except ImportError:
        return "triton is not installed"
    return "" if version >= (3, 8) else f"Triton's interpreter needs triton >= 3.8 here, found {version}"


def triton_device() -> str:
    """Where the Triton kernels run in this session: "cuda" on a GPU, "cpu" under the interpreter; skips the test
    when neither can."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    why = interpreter_ok()
    if why:
        pytest.skip(why)
    return "cpu"


def assert_close_to_reference(out: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, what: str = "output"):
    """out (the op in some dtype) may differ from the float64 reference at most twice as much as the plain
    PyTorch computation in the same dtype does, plus a small floor. NaN never passes."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out, plain, ref64 = out.cpu(), plain.cpu(), ref64.cpu()
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    plain_err = (plain.double() - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * plain_err + ATOL[out.dtype] * max(1.0, ref64.abs().max().item() if out.numel() else 1.0)
    assert err <= bound, f"{what}: error {err:.3e} above bound {bound:.3e} (plain {out.dtype} error {plain_err:.3e})"


@pytest.fixture
def gen():
    """A fresh, seeded generator per test, so failures reproduce."""
    return torch.Generator().manual_seed(1234)
