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


def check_positive_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> Optional[int]:
    """An int >= minimum (bools refused); None passes when optional."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")
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


KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value, dims: Optional[Sequence[int]] = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in KERNEL_FLOATS:  # float8 is floating too, but no kernel computes in it
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {value.dtype}")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")
    return value


def check_not_requiring_grad(name: str, written) -> None:
    """An op that writes tensors in place and has no autograd formula must not write one that autograd tracks (a
    leaf that requires grad, or a tensor in a graph): its gradient would silently leave the write out. written: the
    tensor, or a list of them (named name[i])."""
    if not torch.is_grad_enabled():
        return
    named = [(name, written)] if isinstance(written, torch.Tensor) else \
        [(f"{name}[{i}]", t) for i, t in enumerate(written)]
    for label, t in named:
        if t.requires_grad:
            raise ValueError(f"{label} requires grad, but the op writes it in place outside autograd (no gradient "
                             f"flows through the write); pass a tensor that does not require grad (.detach())")


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


def _bytes(t: torch.Tensor) -> tuple:
    """(first byte, one past the last byte) of a tensor with any (non-negative) strides."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def _span(t: torch.Tensor) -> tuple:
    """(device type, index, first byte, one past the last byte)."""
    return (t.device.type, t.device.index or 0, *_bytes(t))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements in the same layout: each element of a read is the one written at its place."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _read_overlap(reads_name: str, read: int, name: str, written: int) -> ValueError:
    return ValueError(f"{reads_name}[{read}] overlaps {name}[{written}] in memory; a tensor read must not share "
                      f"memory with one written ({reads_name}[i] may only be {name}[i] itself)")


def check_apart(name: str, written: torch.Tensor, **reads: torch.Tensor) -> None:
    """No tensor an op reads may share any byte with the one it writes (an op whose every output element reads many
    input elements, as a matrix product, has no in-place exception)."""
    if torch.compiler.is_compiling() or not written.numel() or written.device.type == "meta":
        return  # (meta tensors have no memory: every data_ptr() is 0)
    start_w, end_w = _bytes(written)
    for read_name, read in reads.items():
        if read.numel():
            start_r, end_r = _bytes(read)
            if start_w < end_r and start_r < end_w:
                raise ValueError(f"{read_name} shares memory with {name}, which the op writes while reading "
                                 f"{read_name}; pass a copy ({read_name}.clone())")


def check_disjoint(name: str, tensors: Sequence[torch.Tensor], reads_name: str = "",
                   reads: Sequence[torch.Tensor] = ()) -> None:
    """No two contiguous tensors that an op writes may overlap in memory: the writes would race on a GPU (and add
    twice on the CPU). Views of one flat buffer that do not overlap are fine. Nor may a tensor the op reads (`reads`,
    any strides) overlap one it writes (their byte ranges: conservative for interleaved strided views), unless
    reads[i] is exactly tensors[i] (each element reads itself before it is written): it would be read after some
    of its elements were written. (Under torch.compile tracing there are no addresses to compare: the C++ kernels
    check for themselves.)"""
    if torch.compiler.is_compiling():
        return
    if len(tensors) == 1 and len(reads) == 1:  # the gradient hook's call, once per weight per batch: the short way
        # (the pair is on one device: check_tensor_lists saw to it)
        if tensors[0].numel() and reads[0].numel() and not _same_view(reads[0], tensors[0]):
            (start_w, end_w), (start_r, end_r) = _bytes(tensors[0]), _bytes(reads[0])
            if start_w < end_r and start_r < end_w:
                raise _read_overlap(reads_name, 0, name, 0)
        return
    spans = sorted((*_span(t), i) for i, t in enumerate(tensors) if t.numel())
    for a, b in zip(spans, spans[1:]):
        if a[:2] == b[:2] and b[2] < a[3]:
            first, second = sorted((a[4], b[4]))
            raise ValueError(f"{name}[{first}] and {name}[{second}] overlap in memory; each tensor written must be "
                             f"distinct")
    itself = [i < len(tensors) and _same_view(r, tensors[i]) for i, r in enumerate(reads)]
    spans = sorted([(*span, False, i) for *span, i in spans]
                   + [(*_span(r), True, i) for i, r in enumerate(reads) if r.numel() and not itself[i]])
    furthest = {}  # (device, read?) -> the span of that kind reaching furthest so far; sorted by start, an overlap
    for span in spans:  # shows as a span starting before the furthest end of the other kind
        device, start, read = span[:2], span[2], span[4]
        other = furthest.get((device, not read))
        if other is not None and start < other[3]:
            written, read_one = (other, span) if read else (span, other)
            raise _read_overlap(reads_name, read_one[5], name, written[5])
        if furthest.get((device, read), (0, 0, 0, -1))[3] < span[3]:
            furthest[device, read] = span
