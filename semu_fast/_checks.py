"""Argument checks shared by every layer (a leaf: it imports nothing of semu_fast). Each error names the parameter
and says what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_number(name: str, value, *, positive: bool = True, optional: bool = False) -> Optional[float]:
    """A finite number, > 0 (positive) or >= 0; None passes when optional."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number"
                         f"{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_gamma(name: str, value) -> float:
    """A share of gradient variance: a finite number in (0, 1], numpy's included (every caller keeps the float this
    returns)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the share of gradient variance to keep), got {value!r}")
    return float(value)


def check_callable(name: str, value, signature: str) -> None:
    """None or a callable; `signature` says how it is called, for the error."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be None or a callable {signature}, got {type(value).__name__}")


def check_tensor(name: str, value, dims: Optional[Sequence[int]] = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {value.dtype}")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_tensor_lists(first_name: str, first, second_name: str, second) -> tuple[list, list]:
    """Two equally long lists of floating tensors, pairwise of one shape and one device."""
    for name, value in ((first_name, first), (second_name, second)):
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    first, second = list(first), list(second)
    if len(first) != len(second):
        raise ValueError(f"{first_name} and {second_name} must have the same length, "
                         f"got {len(first)} and {len(second)}")
    for i, (a, b) in enumerate(zip(first, second)):
        check_tensor(f"{first_name}[{i}]", a)
        check_tensor(f"{second_name}[{i}]", b)
        if a.shape != b.shape:
            raise ValueError(f"{second_name}[{i}] has shape {tuple(b.shape)} but {first_name}[{i}] has shape "
                             f"{tuple(a.shape)}")
        if a.device != b.device:
            raise ValueError(f"{first_name}[{i}] and {second_name}[{i}] must be on one device, got {a.device} and "
                             f"{b.device}")
    return first, second


def check_disjoint(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """No two contiguous tensors that an op writes may overlap in memory: the writes would race on a GPU (and add
    twice on the CPU). Views of one flat buffer that do not overlap are fine. (Under torch.compile tracing there are
    no addresses to compare: the C++ kernels check for duplicates themselves.)"""
    if torch.compiler.is_compiling():
        return
    spans = sorted((t.device.type, t.device.index or 0, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(tensors) if t.numel())
    for a, b in zip(spans, spans[1:]):
        if a[:2] == b[:2] and b[2] < a[3]:
            first, second = sorted((a[4], b[4]))
            raise ValueError(f"{name}[{first}] and {name}[{second}] overlap in memory; each tensor written must be "
                             f"distinct")
