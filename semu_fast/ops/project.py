"""sf.ops.project_perpendicular_ (in place, for the gradient accumulators) and sf.ops.project_perpendicular (out of
place): G - c W with c = <G,W>/||W||^2 ("orthogonal"), <G,W>/||W|| ("official", the official code's) or 0 ("none"),
reductions in float64.

Backends of the in-place op: C++ (CPU) and CUDA (multi-tensor, deterministic two-pass reductions) in csrc/, torch."""
from __future__ import annotations

import torch

from .._checks import check_choice, check_disjoint, check_not_requiring_grad, check_tensor_lists
from . import reference
from ._library import Kernel
from .._profile import annotate

PROJECTIONS = ("orthogonal", "official", "none")
SCHEMA = "project_perpendicular_(Tensor(a!)[] grads, Tensor[] weights, str projection) -> Tensor"


def _check(grads, weights, mode):
    check_choice("mode", mode, PROJECTIONS)
    grads, weights = check_tensor_lists("grads", grads, "weights", weights)
    check_not_requiring_grad("grads", grads)
    for i, g in enumerate(grads):
        if g.dtype != torch.float32 or not g.is_contiguous():
            raise TypeError(f"project_perpendicular_: grads[{i}] must be a contiguous float32 tensor (an "
                            f"accumulator), got {g.dtype}{'' if g.is_contiguous() else ', non-contiguous'}")
    check_disjoint("grads", grads, "weights", weights)
    return grads, weights


def _torch(grads, weights, projection):
    grads, weights = _check(grads, weights, projection)
    energies = []
    for g, w in zip(grads, weights):
        g.copy_(g.double() - reference.projection_coefficient(g, w, projection) * w.double())
        energies.append(g.double().square().sum())
    return torch.stack(energies) if energies else torch.empty(0, dtype=torch.float64)


def _fake(grads, weights, projection):
    return (grads[0].new_empty(len(grads), dtype=torch.float64) if grads
            else torch.empty(0, dtype=torch.float64))


@torch.library.custom_op("semu_fast::project_perpendicular", mutates_args=())
def _project_perpendicular(grads: list[torch.Tensor], weights: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    return reference.project_perpendicular(grads, weights, mode)


@_project_perpendicular.register_fake
def _(grads, weights, mode):
    return [torch.empty_like(g) for g in grads]


KERNELS = {
    "project_perpendicular_": Kernel(SCHEMA, fake=_fake, impls={"torch": _torch}, cpp=True),
    "project_perpendicular": Kernel(None, note="none: this out-of-place op is the float64 reference; "
                                               "project_perpendicular_ is the fast in-place one"),
}


def project_perpendicular_(grads, weights, mode: str = "orthogonal") -> torch.Tensor:
    """In place: grads[i] -= c_i weights[i] (c as in project_perpendicular), for all layers in one call.

    grads: contiguous float32 tensors (the gradient accumulators), not overlapping; weights: same shapes, any float
    dtype, sharing no memory with a grad (but weights[i] may be grads[i]). The reduction runs in float64. Returns
    the float64 energies ||grads[i]||_F^2 after the projection (the total variance each layer's rank rule needs),
    computed in the same pass.
    """
    grads, weights = _check(grads, weights, mode)
    if not grads:  # the dispatcher cannot route a call without tensors
        return torch.empty(0, dtype=torch.float64)
    with annotate("semu_fast.project_perpendicular_"):
        return torch.ops.semu_fast.project_perpendicular_(grads, weights, mode)


def project_perpendicular(grads, weights, mode: str = "orthogonal") -> list[torch.Tensor]:
    """G - c W for each pair, c = <G,W>/||W||^2 ("orthogonal"), <G,W>/||W|| ("official") or 0 ("none").

    grads, weights: lists of equally shaped float tensors (any shape: conv weights are projected whole).
    Returns new tensors in each grad's dtype; the reduction runs in float64. A zero weight leaves G as it is."""
    check_choice("mode", mode, PROJECTIONS)
    grads, weights = check_tensor_lists("grads", grads, "weights", weights)
    return torch.ops.semu_fast.project_perpendicular(grads, weights, mode)
