"""The public ops of semu_fast and the one place that picks their backends.

Every op is torch.ops.semu_fast.<op> whatever serves it, with a fake (meta) implementation so torch.compile can
trace it. C++/CUDA kernels register themselves when semu_fast._C loads; for each op and device this module then
fills in, once, the best Python-side backend where the extension has no kernel (or where SEMU_FAST_IMPL forces
one). `semu_fast.backends()` shows the outcome and the reasons."""
from __future__ import annotations

import os
import warnings

import torch

from . import _backends
from . import reference
from ._checks import check_tensor_lists
from .config import PROJECTIONS, _check_choice
from .lowrank import KERNEL_FAKES, KERNEL_IMPLS, KERNEL_SCHEMAS
from .lowrank import lowrank_conv2d, lowrank_linear  # noqa: F401  (public ops)
from .svd import truncated_svd  # noqa: F401  (public op)

_lib = torch.library.Library("semu_fast", "FRAGMENT")

# The same schemas csrc/ops.cpp defines, used only when semu_fast._C is missing (a test keeps the two equal).
SCHEMAS = {
    "accumulate_": "accumulate_(Tensor(a!)[] accumulators, Tensor[] grads) -> ()",
    "gram_svd": "gram_svd(Tensor G) -> (Tensor U, Tensor S, Tensor Vh)",
    "project_perpendicular_": "project_perpendicular_(Tensor(a!)[] grads, Tensor[] weights, str projection) -> Tensor",
}
GRAM_SVD_MAX_N = 64  # csrc/gram_svd.h: kGramSvdMaxN
GRAM_SVD_REL_TOL = 1e-7  # csrc/gram_svd.h: kGramSvdRelTol

# Preference per dispatch key; "triton" on CPU only when forced (it needs TRITON_INTERPRET=1 there).
_PREFERENCE = {"CPU": ("cpp", "torch"), "CUDA": ("cuda", "triton", "torch")}
# Kernels that stay behind composed cuBLAS until a GPU run shows they win (benchmarks/bench_adapter.py).
_NOT_YET_FASTER = {"dual_matmul", "conv_delta_add", "conv_delta_contract"}
_TRITON_MODULE = {"accumulate_": "accumulate", "dual_matmul": "lowrank", "conv_delta_add": "lowrank",
                  "conv_delta_contract": "lowrank"}


def _check_accumulate(accumulators, grads):
    accumulators, grads = check_tensor_lists("accumulators", accumulators, "grads", grads)
    for i, acc in enumerate(accumulators):
        if acc.dtype != torch.float32:
            raise TypeError(f"accumulate_: accumulators[{i}] must be float32, got {acc.dtype}")
        if not acc.is_contiguous():
            raise ValueError(f"accumulate_: accumulators[{i}] must be contiguous")
    return accumulators, grads


def _accumulate_torch(accumulators, grads):
    reference.accumulate_(*_check_accumulate(accumulators, grads))


def _accumulate_triton(accumulators, grads):
    _backends.triton_module("accumulate")[0].accumulate_(*_check_accumulate(accumulators, grads))


def _check_gram_svd(G):
    if G.dim() != 3 or not G.is_floating_point() or not 1 <= G.shape[-1] <= GRAM_SVD_MAX_N or G.shape[1] < 1:
        raise ValueError(f"gram_svd: G must be a floating (B, m, n) tensor with m >= 1 and 1 <= n <= "
                         f"{GRAM_SVD_MAX_N}, got {G.dtype} of shape {tuple(G.shape)}")


def _gram_svd_torch(G):
    """torch.linalg.svd with gram_svd's conventions: float32 (float64 for float64 input) and singular values
    below GRAM_SVD_REL_TOL of the largest set to 0, with zero U columns."""
    _check_gram_svd(G)
    U, S, Vh = torch.linalg.svd(G.to(reference.svd_compute_dtype(G.dtype)), full_matrices=False)
    keep = S > GRAM_SVD_REL_TOL * S[..., :1]
    return U * keep.unsqueeze(-2), S * keep, Vh


def _gram_svd_fake(G):
    q = min(G.shape[1], G.shape[2])
    dtype = reference.svd_compute_dtype(G.dtype)
    return (G.new_empty(G.shape[0], G.shape[1], q, dtype=dtype), G.new_empty(G.shape[0], q, dtype=dtype),
            G.new_empty(G.shape[0], q, G.shape[2], dtype=dtype))


def _check_project(grads, weights, mode):
    _check_choice("mode", mode, PROJECTIONS)
    grads, weights = check_tensor_lists("grads", grads, "weights", weights)
    for i, g in enumerate(grads):
        if g.dtype != torch.float32 or not g.is_contiguous():
            raise TypeError(f"project_perpendicular_: grads[{i}] must be a contiguous float32 tensor (an "
                            f"accumulator), got {g.dtype}{'' if g.is_contiguous() else ', non-contiguous'}")
    return grads, weights


def _project_torch(grads, weights, projection):
    grads, weights = _check_project(grads, weights, projection)
    energies = []
    for g, w in zip(grads, weights):
        g.copy_(g.double() - reference.projection_coefficient(g, w, projection) * w.double())
        energies.append(g.double().square().sum())
    return torch.stack(energies) if energies else torch.empty(0, dtype=torch.float64)


def _project_fake(grads, weights, projection):
    return (grads[0].new_empty(len(grads), dtype=torch.float64) if grads
            else torch.empty(0, dtype=torch.float64))


def _lowrank_triton(name):
    """The Triton kernel of a lowrank kernel op; float64 (which it does not serve) goes to the composed one."""
    def impl(*args):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            return KERNEL_IMPLS[name](*args)
        return getattr(_backends.triton_module("lowrank")[0], name)(*args)
    return impl


_PYTHON_IMPLS = {"accumulate_": {"torch": _accumulate_torch, "triton": _accumulate_triton},
                 "gram_svd": {"torch": _gram_svd_torch},
                 "project_perpendicular_": {"torch": _project_torch},
                 **{name: {"torch": fn, "triton": _lowrank_triton(name)} for name, fn in KERNEL_IMPLS.items()}}
_FAKES = {"accumulate_": lambda accumulators, grads: None, "gram_svd": _gram_svd_fake,
          "project_perpendicular_": _project_fake, **KERNEL_FAKES}


def _availability(op: str, device: str, backend: str) -> str:
    """"" when backend can serve op on device, else why not."""
    if backend in ("cpp", "cuda"):
        ext, why = _backends.extension()
        if ext is None:
            return why
        return "" if _backends.has_cpp_kernel(op, device) else f"semu_fast._C was built without a {device} kernel"
    if backend == "triton":
        if "triton" not in _PYTHON_IMPLS.get(op, {}):
            return "no Triton kernel for this op"
        if device == "CPU" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return _backends.triton_module(_TRITON_MODULE[op])[1]
    return ""


def _register_backends(op: str) -> None:
    force = _backends.forced()
    for device, preference in _PREFERENCE.items():
        candidates = [b for b in _backends.BACKENDS if b != ("cuda" if device == "CPU" else "cpp")]
        reasons = {b: _availability(op, device, b) for b in candidates}
        if op in _NOT_YET_FASTER and device == "CUDA" and not reasons["triton"]:
            reasons["triton"] = ("not yet measured faster than composed cuBLAS calls on a GPU; "
                                 f"{_backends.IMPL_ENV}=triton uses it")
        usable = [b for b in preference if not reasons[b]]
        chosen = usable[0]  # "torch" is always usable
        if force in reasons:
            if reasons[force] and not reasons[force].startswith("not yet measured"):
                warnings.warn(f"{_backends.IMPL_ENV}={force} cannot serve {op} on {device}: {reasons[force]}; "
                              f"using {chosen}")
            else:
                chosen = force
        if chosen not in ("cpp", "cuda"):
            _lib.impl(op, _PYTHON_IMPLS[op][chosen], device)
        _backends.record(op, device, chosen, {b: r for b, r in reasons.items() if r and b != chosen})


for _op, _schema in {**SCHEMAS, **KERNEL_SCHEMAS}.items():
    if _op in KERNEL_SCHEMAS or _backends.extension()[0] is None:
        _lib.define(_schema)
    torch.library.register_fake(f"semu_fast::{_op}", _FAKES[_op], lib=_lib)
    _register_backends(_op)


@torch.library.custom_op("semu_fast::project_perpendicular", mutates_args=())
def _project_perpendicular(grads: list[torch.Tensor], weights: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    return reference.project_perpendicular(grads, weights, mode)


@_project_perpendicular.register_fake
def _(grads, weights, mode):
    return [torch.empty_like(g) for g in grads]


for _device in _PREFERENCE:
    _backends.record("project_perpendicular", _device, "torch", {
        b: "none: this out-of-place op is the float64 reference; project_perpendicular_ is the fast in-place one"
        for b in ("cpp" if _device == "CPU" else "cuda", "triton")})


def accumulate_(accumulators, grads) -> None:
    """accumulators[i] += grads[i] for every i, in one call.

    accumulators: float32, contiguous; grads: same shapes, any float dtype (float32/float16/bfloat16/float64)."""
    torch.ops.semu_fast.accumulate_(*_check_accumulate(accumulators, grads))


def gram_svd(G: torch.Tensor):
    """Thin SVDs of a batch of (m, n) matrices with small n (conv gradients per input channel: n = kh*kw <= 64),
    through each n x n Gram matrix in float64 and a Jacobi eigen-solve.

    G: (B, m, n), any float dtype. Returns U (B, m, q), S (B, q) descending, Vh (B, q, n), q = min(m, n), in float32
    (float64 for float64 input). Singular values below 1e-7 of a matrix's largest are returned as 0, with zero U
    columns (Gram squaring cannot resolve them; float32 could not either)."""
    _check_gram_svd(G)
    return torch.ops.semu_fast.gram_svd(G)


def project_perpendicular_(grads, weights, mode: str = "orthogonal") -> torch.Tensor:
    """In place: grads[i] -= c_i weights[i] (c as in project_perpendicular), for all layers in one call.

    grads: contiguous float32 tensors (the gradient accumulators); weights: same shapes, any float dtype.
    The reduction runs in float64. Returns the float64 energies ||grads[i]||_F^2 after the projection (the total
    variance each layer's rank rule needs), computed in the same pass."""
    return torch.ops.semu_fast.project_perpendicular_(*_check_project(grads, weights, mode), mode)


def project_perpendicular(grads, weights, mode: str = "orthogonal") -> list[torch.Tensor]:
    """G - c W for each pair, c = <G,W>/||W||^2 ("orthogonal"), <G,W>/||W|| ("official") or 0 ("none").

    grads, weights: lists of equally shaped float tensors (any shape: conv weights are projected whole).
    Returns new tensors in each grad's dtype; the reduction runs in float64. A zero weight leaves G as it is."""
    _check_choice("mode", mode, PROJECTIONS)
    grads, weights = check_tensor_lists("grads", grads, "weights", weights)
    return torch.ops.semu_fast.project_perpendicular(grads, weights, mode)
