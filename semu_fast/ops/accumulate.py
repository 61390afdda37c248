"""sf.ops.accumulate_: float32 accumulators += gradients of any float dtype, many tensors in one call; and
sf.ops.accumulate_matmul_: a float32 accumulator += a @ b (a Linear's weight gradient dy^T x, formed and summed in
float32 from bf16/fp16 activations, never rounded to their dtype).

accumulate_ backends: C++ (CPU) and CUDA (multi-tensor: one launch for all tensors) in csrc/, Triton
(semu_fast.triton_kernels.accumulate), torch (the reference loop). accumulate_matmul_: torch (cuBLAS with float32
output from half-precision inputs where torch offers it, else a float32 addmm)."""
from __future__ import annotations

import torch

from .._checks import (check_apart, check_disjoint, check_not_requiring_grad, check_same_device, check_tensor,
                       check_tensor_lists)
from . import _registry, reference
from ._library import Kernel
from .._profile import annotate

SCHEMA = "accumulate_(Tensor(a!)[] accumulators, Tensor[] grads) -> ()"


def _check(accumulators, grads):
    accumulators, grads = check_tensor_lists("accumulators", accumulators, "grads", grads)
    check_not_requiring_grad("accumulators", accumulators)
    for i, acc in enumerate(accumulators):
        if acc.dtype != torch.float32:
            raise TypeError(f"accumulate_: accumulators[{i}] must be float32, got {acc.dtype}")
        if not acc.is_contiguous():
            raise ValueError(f"accumulate_: accumulators[{i}] must be contiguous")
    check_disjoint("accumulators", accumulators, "grads", grads)
    return accumulators, grads


def _torch(accumulators, grads):
    reference.accumulate_(*_check(accumulators, grads))


def _triton(accumulators, grads):
    _registry.triton_module("accumulate")[0].accumulate_(*_check(accumulators, grads))


def _check_matmul(acc, a, b):
    check_tensor("acc", acc, dims=(2,))
    check_tensor("a", a, dims=(2,))
    check_tensor("b", b, dims=(2,))
    if acc.dtype != torch.float32 or not acc.is_contiguous():
        raise TypeError(f"accumulate_matmul_: acc must be a contiguous float32 tensor, got {acc.dtype}"
                        f"{'' if acc.is_contiguous() else ', non-contiguous'}")
    if a.shape[1] != b.shape[0] or acc.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"accumulate_matmul_: acc {tuple(acc.shape)} += a {tuple(a.shape)} @ b {tuple(b.shape)} "
                         f"needs acc (m, n), a (m, k), b (k, n)")
    if a.dtype != b.dtype:
        raise TypeError(f"accumulate_matmul_: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    check_same_device(acc=acc, a=a, b=b)
    check_not_requiring_grad("acc", acc)
    check_apart("acc", acc, a=a, b=b)
    return acc, a, b


_HALF = (torch.bfloat16, torch.float16)
_OUT_DTYPE_ADDMM: dict = {}  # device type -> whether torch.addmm(..., out_dtype=float32, out=acc) works there


def _addmm_out_dtype(device: torch.device) -> bool:
    """Whether this torch has cuBLAS's half-precision GEMM with a float32 output (aten::addmm.dtype_out) on this
    device, checked once on a tiny case against the float32 result."""
    if device.type not in _OUT_DTYPE_ADDMM:
        try:
            a = torch.randn(8, 8, device=device)
            acc = torch.ones(8, 8, device=device)
            torch.addmm(acc, a.bfloat16(), a.bfloat16(), out_dtype=torch.float32, out=acc)
            want = 1 + a.bfloat16().float() @ a.bfloat16().float()
            _OUT_DTYPE_ADDMM[device.type] = bool(torch.allclose(acc, want, rtol=1e-5, atol=1e-5))
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_ADDMM[device.type] = False
    return _OUT_DTYPE_ADDMM[device.type]


def _matmul_torch(acc, a, b):
    if a.dtype in _HALF and acc.is_cuda and _addmm_out_dtype(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # products summed in float32 by cuBLAS
    elif a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:  # exact upcast: a bf16/fp16 product is exact in float32, and float64 inputs sum in float32 here too
        acc.addmm_(a.float(), b.float())


# Measured on an H200 (benchmarks/RESULTS.md): the Triton kernel (one launch per tensor) moved 4.05 TB/s with bf16
# gradients and 4.06 with fp32; the multi-tensor CUDA kernel 2.97 and 3.70 (a plain torch loop: 2.68 and 4.08).
_CUDA_SLOWER = "measured slower than the Triton kernel on an H200 (2.97 vs 4.05 TB/s with bf16 gradients)"
KERNELS = {"accumulate_": Kernel(SCHEMA, fake=lambda accumulators, grads: None,
                                 impls={"torch": _torch, "triton": _triton}, cpp=True, triton_module="accumulate",
                                 cuda_after_triton=_CUDA_SLOWER),
           "accumulate_matmul_": Kernel("accumulate_matmul_(Tensor(a!) acc, Tensor a, Tensor b) -> ()",
                                        fake=lambda acc, a, b: None, impls={"torch": _matmul_torch})}


def accumulate_(accumulators, grads) -> None:
    """accumulators[i] += grads[i] for every i, in one call.

    accumulators: float32, contiguous, not overlapping; grads: same shapes, any float dtype (float32, float16,
    bfloat16, float64), any strides, sharing no memory with an accumulator (but grads[i] may be accumulators[i])."""
    accumulators, grads = _check(accumulators, grads)
    if not accumulators:  # the dispatcher cannot route a call without tensors
        return
    with annotate("semu_fast.accumulate_"):
        torch.ops.semu_fast.accumulate_(accumulators, grads)


def accumulate_matmul_(acc, a, b) -> None:
    """acc += a @ b with the products summed in float32.

    acc: (m, n) float32, contiguous; a: (m, k), b: (k, n), one float dtype, any strides, sharing no memory with acc.
    A Linear's weight gradient over a batch is accumulate_matmul_(acc, dy.T, x) with dy (tokens, out) and x (tokens,
    in)."""
    acc, a, b = _check_matmul(acc, a, b)
    with annotate("semu_fast.accumulate_matmul_"):
        torch.ops.semu_fast.accumulate_matmul_(acc, a, b)
