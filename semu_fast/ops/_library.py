"""Registers the ops of semu_fast.ops with torch.library, each from its module's KERNELS table.

Every op is torch.ops.semu_fast.<op> whatever serves it, with a fake (meta) implementation so torch.compile can
trace it. C++/CUDA kernels register themselves when semu_fast._C loads (csrc/ops.cpp defines their schemas); for
each op and dispatch key this module then registers, once, the best Python-side backend where the extension has no
kernel, or the one SEMU_FAST_IMPL forces, and records the choice with the reasons for every backend not taken."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _registry

_lib = torch.library.Library("semu_fast", "FRAGMENT")

# Preference per dispatch key; "triton" on CPU only when forced (it needs TRITON_INTERPRET=1 there).
PREFERENCE = {"CPU": ("cpp", "torch"), "CUDA": ("cuda", "triton", "torch")}


@dataclass(frozen=True)
class Kernel:
    """One op's registration entry.

    schema: its torch.library schema; None for an op defined with torch.library.custom_op in its module (then it is
        only recorded, as served by "torch"). fake: its meta implementation. impls: Python-side backends by name
        ("torch" always; "triton" optional). cpp: csrc/ops.cpp defines the schema and semu_fast._C may hold C++/CUDA
        kernels. triton_module: the semu_fast.triton_kernels module the Triton backend needs. triton_gate: when set,
        why the Triton kernel is not the CUDA default (it serves only when forced). cuda_after_triton: when set, the
        Triton kernel comes before the CUDA one on a GPU, for the measured reason given."""

    schema: Optional[str]
    fake: Optional[Callable] = None
    impls: dict = field(default_factory=dict)
    cpp: bool = False
    triton_module: Optional[str] = None
    triton_gate: Optional[str] = None
    cuda_after_triton: Optional[str] = None  # when set: the Triton kernel measured faster on a GPU, and why
    note: str = ""  # why an op has a single backend (shown for the others)


def _availability(op: str, kernel: Kernel, device: str, backend: str) -> str:
    """"" when backend can serve op on device, else why not."""
    if backend in ("cpp", "cuda"):
        if not kernel.cpp:
            return kernel.note or "no C++/CUDA kernel for this op"
        ext, why = _registry.extension()
        if ext is None:
            return why
        return "" if _registry.has_cpp_kernel(op, device) else f"semu_fast._C was built without a {device} kernel"
    if backend == "triton":
        if "triton" not in kernel.impls:
            return kernel.note or "no Triton kernel for this op"
        if device == "CPU" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        why = _registry.triton_module(kernel.triton_module)[1]
        if why or device == "CPU":
            return why
        return kernel.triton_gate or ""
    return ""


def _choose(op: str, kernel: Kernel, device: str) -> None:
    candidates = [b for b in _registry.BACKENDS if b != ("cuda" if device == "CPU" else "cpp")]
    reasons = {b: _availability(op, kernel, device, b) for b in candidates}
    preference = PREFERENCE[device]
    if device == "CUDA" and kernel.cuda_after_triton:
        preference = ("triton", "cuda", "torch")
    usable = [b for b in preference if not reasons[b]]
    chosen = usable[0]  # "torch" is always usable
    if chosen == "triton" and kernel.cuda_after_triton and not reasons["cuda"]:
        reasons["cuda"] = f"{kernel.cuda_after_triton}; {_registry.IMPL_ENV}=cuda uses it"
    force = _registry.forced()
    gated = reasons.get(force) in (kernel.triton_gate, f"{kernel.cuda_after_triton}; {_registry.IMPL_ENV}=cuda uses it")
    if force in reasons and force != chosen:
        if reasons[force] and not gated:
            warnings.warn(f"{_registry.IMPL_ENV}={force} cannot serve {op} on {device}: {reasons[force]}; "
                          f"using {chosen}")
        else:
            chosen = force
    if chosen not in ("cpp", "cuda"):
        _lib.impl(op, kernel.impls[chosen], device)
    _registry.record(op, device, chosen, {b: r for b, r in reasons.items() if r and b != chosen})


def _register_version_bump(op: str) -> None:
    """An ADInplaceOrView kernel for an op that writes some of its arguments in place (Tensor(a!) in its schema):
    after the op, each written tensor's version counter moves, as a native in-place op's does, so that autograd
    refuses a backward through a tensor it saved and the op changed since. (A C++ or CUDA kernel registered for the
    CPU or CUDA key alone leaves the counter as it was: that backward then ran silently on the changed values.)"""
    overload = getattr(torch.ops.semu_fast, op).default
    written = [i for i, arg in enumerate(overload._schema.arguments)
               if arg.alias_info is not None and arg.alias_info.is_write]
    if not written:
        return

    def bump_versions(keyset, *args):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out = overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        for i in written:
            torch.autograd.graph.increment_version(args[i])
        return out

    _lib.impl(op, bump_versions, "ADInplaceOrView", with_keyset=True)


def register(kernels: dict[str, Kernel]) -> None:
    """Define (where csrc/ops.cpp does not), fake and back every op of one module's table."""
    for op, kernel in kernels.items():
        if kernel.schema is None:
            for device in PREFERENCE:
                _registry.record(op, device, "torch", {b: kernel.note for b in _registry.BACKENDS
                                                       if b not in ("torch", "cuda" if device == "CPU" else "cpp")})
            continue
        if not kernel.cpp or _registry.extension()[0] is None:
            _lib.define(kernel.schema)
        torch.library.register_fake(f"semu_fast::{op}", kernel.fake, lib=_lib)
        _register_version_bump(op)
        for device in PREFERENCE:
            _choose(op, kernel, device)
