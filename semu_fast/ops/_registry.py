"""Which backends exist here, and which one serves each op (xformers-style: every backend not taken says why).

A leaf of semu_fast.ops: probes of semu_fast._C and of the Triton kernels, the SEMU_FAST_IMPL switch, and the
table of choices that semu_fast.ops._library fills while it registers the ops. Backends: "cpp" (semu_fast._C on
CPU), "cuda" (semu_fast._C on CUDA), "triton" (semu_fast.triton_kernels) and "torch" (composed PyTorch, always
present)."""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from typing import Optional

import torch

IMPL_ENV = "SEMU_FAST_IMPL"
BACKENDS = ("cpp", "cuda", "triton", "torch")


@lru_cache(maxsize=None)
def extension() -> tuple[Optional[object], str]:
    """(semu_fast._C or None, why not). Importing it registers the C++/CUDA kernels with the dispatcher."""
    try:
        return importlib.import_module("semu_fast._C"), ""
    except ImportError as err:
        return None, f"semu_fast._C is not built or does not load ({err}); run the set-up command of README.md"


@lru_cache(maxsize=None)
def triton_module(name: str) -> tuple[Optional[object], str]:
    """(semu_fast.triton_kernels.<name> or None, why not)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return None, "Triton needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)"
    try:
        return importlib.import_module(f"semu_fast.triton_kernels.{name}"), ""
    except ImportError as err:
        return None, f"Triton kernels do not import ({err})"


def has_cpp_kernel(op: str, device: str) -> bool:
    """Whether semu_fast._C registered a kernel for semu_fast::<op> on dispatch key "CPU" or "CUDA"."""
    extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"semu_fast::{op}", device)


def forced() -> Optional[str]:
    """The backend SEMU_FAST_IMPL asks for, or None. An unknown name is ignored with a warning: import never fails."""
    value = os.environ.get(IMPL_ENV)
    if value and value not in BACKENDS:
        warnings.warn(f"{IMPL_ENV} must be one of {', '.join(BACKENDS)}, got {value!r}; ignoring it")
        return None
    return value or None


def build_info() -> dict:
    """What semu_fast._C was compiled with (CUDA archs, CUDA and compiler versions); {} without the extension."""
    ext, _ = extension()
    info = getattr(ext, "build_info", None)
    return dict(info()) if info is not None else {}


# op -> dispatch key -> {"chosen": backend, "reasons": {backend: why not}}
_CHOICES: dict[str, dict[str, dict]] = {}


def record(op: str, device: str, chosen: str, reasons: dict[str, str]) -> None:
    _CHOICES.setdefault(op, {})[device] = {"chosen": chosen, "reasons": dict(reasons)}


def choices() -> dict[str, dict[str, dict]]:
    """A copy of the table: per op and dispatch key, the backend that serves it and why each other one does not."""
    return {op: {dev: {"chosen": v["chosen"], "reasons": dict(v["reasons"])} for dev, v in devs.items()}
            for op, devs in _CHOICES.items()}
