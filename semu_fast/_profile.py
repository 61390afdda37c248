"""NVTX ranges around the ops and prepare's phases, so an Nsight Systems profile shows where time goes. Without the
nvtx package, or while torch.compile traces, they are no-ops (a range is only a marker for the profiler)."""
from __future__ import annotations

import contextlib

import torch

try:
    import nvtx as _nvtx
except ImportError:  # optional at run time (the GPU check machine lacks it)
    _nvtx = None


def annotate(message: str):
    """A context manager marking `message` on the NVTX timeline (domain "semu_fast")."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(message, domain="semu_fast")
