"""Argument checks shared by the ops: each error names the parameter and says what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


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
        raise ValueError(f"{first_name} and {second_name} must have the same length, got {len(first)} and {len(second)}")
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
