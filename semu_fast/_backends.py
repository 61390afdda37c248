"""Which backends exist here, and why the others do not (xformers-style reasons the user can print).

Backends: "cpp" (semu_fast._C on CPU), "cuda" (semu_fast._C on CUDA), "triton" (semu_fast.triton_kernels) and
"torch" (composed PyTorch, always present). SEMU_FAST_IMPL=torch|triton|cuda|cpp forces one for debugging."""
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
    """Whether semu_fast._C registered a kernel for semu_fast::<op> on device "CPU" or "CUDA"."""
    extension()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"semu_fast::{op}", device)


def forced() -> Optional[str]:
    """The backend SEMU_FAST_IMPL asks for, or None. An unknown name is ignored with a warning: import never fails."""
    value = os.environ.get(IMPL_ENV)
    if value and value not in BACKENDS:
        warnings.warn(f"{IMPL_ENV} must be one of {', '.join(BACKENDS)}, got {value!r}; ignoring it")
        return None
    return value or None


# op -> device -> {"chosen": backend, "reasons": {backend: why not}}; filled by semu_fast.ops at import.
_CHOICES: dict[str, dict[str, dict]] = {}


def record(op: str, device: str, chosen: str, reasons: dict[str, str]) -> None:
    _CHOICES.setdefault(op, {})[device] = {"chosen": chosen, "reasons": dict(reasons)}


def backends() -> dict[str, dict[str, dict]]:
    """Per op and device ("CPU", "CUDA"): the backend that serves it and, for each one that does not, why."""
    import semu_fast.ops  # noqa: F401  (registration fills the table)
    return {op: {dev: dict(v) for dev, v in devs.items()} for op, devs in _CHOICES.items()}


def describe() -> str:
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}"]
    ext, why = extension()
    lines.append(f"semu_fast._C: {'loaded' if ext else why}")
    for op, devs in backends().items():
        for dev, info in devs.items():
            lines.append(f"{op:24s} {dev:5s} -> {info['chosen']}")
            for backend, reason in info["reasons"].items():
                lines.append(f"{'':31s}{backend}: {reason}")
    return "\n".join(lines)
