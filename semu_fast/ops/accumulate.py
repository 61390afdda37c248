"""sf.ops.accumulate_: float32 accumulators += gradients of any float dtype, many tensors in one call.

Backends: C++ (CPU) and CUDA (multi-tensor: one launch for all tensors) in csrc/, Triton
(semu_fast.triton_kernels.accumulate), torch (the reference loop)."""
from __future__ import annotations

import torch

from .._checks import check_disjoint, check_tensor_lists
from . import _registry, reference
from ._library import Kernel
from .._profile import annotate

SCHEMA = "accumulate_(Tensor(a!)[] accumulators, Tensor[] grads) -> ()"


def _check(accumulators, grads):
    accumulators, grads = check_tensor_lists("accumulators", accumulators, "grads", grads)
    for i, acc in enumerate(accumulators):
        if acc.dtype != torch.float32:
            raise TypeError(f"accumulate_: accumulators[{i}] must be float32, got {acc.dtype}")
        if not acc.is_contiguous():
            raise ValueError(f"accumulate_: accumulators[{i}] must be contiguous")
    check_disjoint("accumulators", accumulators)
    return accumulators, grads


def _torch(accumulators, grads):
    reference.accumulate_(*_check(accumulators, grads))


def _triton(accumulators, grads):
    _registry.triton_module("accumulate")[0].accumulate_(*_check(accumulators, grads))


KERNELS = {"accumulate_": Kernel(SCHEMA, fake=lambda accumulators, grads: None,
                                 impls={"torch": _torch, "triton": _triton}, cpp=True, triton_module="accumulate")}


def accumulate_(accumulators, grads) -> None:
    """accumulators[i] += grads[i] for every i, in one call.

    accumulators: float32, contiguous, not overlapping; grads: same shapes, any float dtype (float32, float16,
    bfloat16, float64), any strides."""
    accumulators, grads = _check(accumulators, grads)
    with annotate("semu_fast.accumulate_"):
        torch.ops.semu_fast.accumulate_(accumulators, grads)
