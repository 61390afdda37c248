"""Shared test setup: Triton runs under its interpreter where there is no GPU, and one tolerance table per dtype."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: it decides at @triton.jit time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Floor of the allowed error per dtype, on top of the "twice the plain PyTorch error" rule (flash-attention's).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_reference(out: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, what: str = "output"):
    """out (the op in some dtype) may differ from the float64 reference at most twice as much as the plain
    PyTorch computation in the same dtype does, plus a small floor. NaN never passes."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    bound = 2 * plain_err + ATOL[out.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} above bound {bound:.3e} (plain {out.dtype} error {plain_err:.3e})"


@pytest.fixture
def gen():
    """A fresh, seeded generator per test, so failures reproduce."""
    return torch.Generator().manual_seed(1234)
