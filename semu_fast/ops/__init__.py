"""The ops of semu_fast, each registered as torch.ops.semu_fast.<op> with a fake for torch.compile, and the one
place that says which backend serves each (sf.ops.backends(), sf.ops.describe(); SEMU_FAST_IMPL forces one).

One module per op (checks, torch backend, fake, public wrapper): accumulate, project, svd (truncated_svd and
gram_svd), lowrank (the adapter ops); range_finder is truncated_svd's randomized path and svd_plan its measured
cost model (calibrate); reference holds the plain float64 oracles the tests and benchmarks compare against."""
from __future__ import annotations

import torch

from . import _library, _registry, accumulate, lowrank, project, svd
from .accumulate import accumulate_, accumulate_matmul_
from .svd_plan import calibrate
from .lowrank import lowrank_conv2d, lowrank_linear
from .project import project_perpendicular, project_perpendicular_
from .svd import gram_svd, truncated_svd

for _module in (accumulate, project, svd, lowrank):
    _library.register(_module.KERNELS)

__all__ = ["accumulate_", "accumulate_matmul_", "project_perpendicular_", "project_perpendicular", "truncated_svd",
           "gram_svd", "lowrank_linear", "lowrank_conv2d", "calibrate", "backends", "describe"]


def backends() -> dict[str, dict[str, dict]]:
    """Per op and dispatch key ("CPU", "CUDA"): {"chosen": backend, "reasons": {other backend: why not}}."""
    return _registry.choices()


def describe() -> str:
    """What `semu-fast info` prints: versions, the extension's build, and per op the backend and the reasons."""
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}"]
    ext, why = _registry.extension()
    lines.append(f"semu_fast._C: {'loaded' if ext else why}")
    info = _registry.build_info()
    if info:
        archs = ", ".join(info.get("cuda_archs") or []) or "none"
        lines.append(f"  built with CUDA {info.get('cuda_version')} for {archs}; {info.get('compiler')}; "
                     f"against torch {info.get('torch_version')}")
        lines.extend(f"  {warning}" for warning in _arch_mismatch(info))
    for op, devs in backends().items():
        for dev, choice in devs.items():
            lines.append(f"{op:24s} {dev:5s} -> {choice['chosen']}")
            for backend, reason in choice["reasons"].items():
                lines.append(f"{'':31s}{backend}: {reason}")
    return "\n".join(lines)


def _arch_mismatch(info: dict) -> list[str]:
    """A warning per visible GPU whose architecture the extension was not compiled for."""
    if not info.get("with_cuda") or not torch.cuda.is_available():
        return []
    built = set(info.get("cuda_archs") or [])
    out = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"sm_{major}{minor}"
        if arch not in built:
            out.append(f"WARNING: GPU {index} ({torch.cuda.get_device_name(index)}) is {arch} but semu_fast._C was "
                       f"built for {', '.join(sorted(built)) or 'no GPU'}: rebuild with TORCH_CUDA_ARCH_LIST="
                       f"\"{major}.{minor}\" pip install --no-build-isolation -e .")
    return out
