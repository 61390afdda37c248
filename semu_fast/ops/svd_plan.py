"""Which path truncated_svd(method="auto") takes for a 2-D gradient: a cost model whose constants are measured on
the device at hand (sf.calibrate(); done once automatically and cached per device).

The three paths and their cost for G (m, n), p = min(m, n), q = max(m, n):
  exact       torch.linalg.svd                      svd * q p^2
  gram        eigh of the p x p Gram matrix           gemm * q p^2 (the Gram) + eigh * p^3 + gemm * q p k (U)
  randomized  adaptive range finder, l = k + margin    per 64-column block: thin_gemm * 6 q p 64 (one product, two
                                                       power iterations, B) + svd * q l^2 (the spectrum so far)
  hinted      one sketch of l = rank_hint + margin     thin_gemm * 2 q p l (the sketch, B) + gemm * 2 q l^2 (the QR
              columns (the rank the caller knows)      of B^T) + svd * l^3 (the SVD of its l x l factor)
The hinted path runs first where it is predicted cheapest; then the randomized path, with its basis capped where it
would cost more than the cheaper of gram and exact; it gives up early on a flat spectrum (range_finder), and the
cheaper one runs instead."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Optional

import torch

from .._utils import atomic_write, default_cache, default_device

log = logging.getLogger("semu_fast")

BLOCK = 64          # the range finder's block width (semu_fast.ops.svd.BLOCK)
PASSES = 6          # passes over G per block: the product, 2 power iterations of 2 products, and B = Q^T G
_PROBE = (384, 1152)  # (p, q) of the matrices the calibration times: big enough to run at speed, under a second
# A GPU runs the CPU's probe in microseconds, bound by launch and solver latency, which would price every path at
# LLM sizes many times too high (and the randomized path out of reach): there the probe is LLM-sized.
_PROBE_CUDA = (2048, 6144)


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work on one device (see the module docstring for the units)."""

    gemm: float
    thin_gemm: float
    eigh: float
    svd: float


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """The fastest of `repeats` timed runs: another process's burst only ever adds time, so the minimum is the
    estimate that a busy machine disturbs least."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(device: torch.device) -> Costs:
    """Time each kind of work at a probe size on `device` (about a second on a CPU, a few on a GPU)."""
    with torch.autocast(device.type, enabled=False):  # the products as truncated_svd runs them: in float32
        return _measure(device)


def _measure(device: torch.device) -> Costs:
    p, q = _probe(device)
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(p, q, generator=gen, device=device)
    omega = torch.randn(q, BLOCK, generator=gen, device=device)
    C = (A @ A.T).double()
    return Costs(gemm=_best_seconds(lambda: A @ A.T, device) / (q * p * p),
                 thin_gemm=_best_seconds(lambda: A @ omega, device) / (q * p * BLOCK),
                 eigh=_best_seconds(lambda: torch.linalg.eigh(C), device) / p ** 3,
                 svd=_best_seconds(lambda: torch.linalg.svd(A, full_matrices=False), device) / (q * p * p))


def _probe(device: torch.device) -> tuple[int, int]:
    return _PROBE_CUDA if device.type == "cuda" else _PROBE


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}-threads{torch.get_num_threads()}"
    p, q = _probe(device)  # constants measured at another probe size are not reused
    return f"{name} / torch {torch.__version__} / probe {p}x{q}"


def _cache_file() -> Path:
    return default_cache() / "svd_costs.json"


_COSTS: dict[str, Costs] = {}


# Two measurements whose constants differ by more than this factor were disturbed by other work on the machine.
UNSTEADY = 2.0


def calibrate(device=None, persist: bool = True) -> Costs:
    """Measure the SVD cost model's constants on `device` (default: CUDA when present, else the CPU), use them from
    now on, and (persist) keep them in $SEMU_FAST_CACHE/svd_costs.json for later processes. It measures twice: when
    the two disagree by more than UNSTEADY (a busy machine: on 2 shared cores one constant moved 28x), the faster
    of each is used in this process only and nothing is kept, so that one busy moment does not set every later
    process's plans (a 4096 x 11008 SVD planned from such costs ran 9x slower)."""
    device = torch.device(device if device is not None else default_device())
    first, second = measure(device), measure(device)
    costs = Costs(*(min(a, b) for a, b in zip(astuple(first), astuple(second))))
    spread = max(max(a, b) / max(min(a, b), 1e-300) for a, b in zip(astuple(first), astuple(second)))
    key = _device_key(device)
    _COSTS[key] = costs
    if spread > UNSTEADY:
        log.warning("the SVD cost calibration on %s was unsteady (two measurements %.1fx apart: other work on the "
                    "machine?): it serves this process only; sf.calibrate() on an idle machine keeps one", key, spread)
    elif persist:
        path = _cache_file()
        try:
            saved = json.loads(path.read_text()) if path.exists() else {}
            saved[key] = asdict(costs)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2)))
        except (OSError, ValueError) as err:  # a read-only home or a damaged file: keep the costs in memory only
            log.warning("could not keep the SVD cost calibration in %s (%s)", path, err)
    return costs


def costs(device: torch.device) -> Costs:
    """This device's constants: measured in this process, else read from the cache file, else measured now."""
    key = _device_key(device)
    if key not in _COSTS:
        try:
            _COSTS[key] = Costs(**json.loads(_cache_file().read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            log.info("calibrating the SVD cost model on %s (once; see sf.calibrate)", key)
            calibrate(device)
    return _COSTS[key]


def randomized_seconds(p: int, q: int, columns: int, c: Costs) -> float:
    """Predicted time of the range finder growing a basis of `columns` columns in BLOCK-wide blocks."""
    seconds, width = 0.0, 0
    while width < columns:
        width = min(columns, width + BLOCK)
        seconds += c.thin_gemm * PASSES * q * p * BLOCK + c.svd * q * width * width
    return seconds


@dataclass(frozen=True)
class Plan:
    """fallback: "gram" or "exact", whichever is predicted cheaper for this shape; max_rank: the widest randomized
    basis predicted to cost less than the fallback (0: do not try the randomized path); hinted: try the hinted
    sketch first."""

    fallback: str
    max_rank: int
    seconds: dict
    hinted: bool = False


def hinted_seconds(p: int, q: int, width: int, c: Costs) -> float:
    """Predicted time of the hinted path: the sketch and B = Q^T A, then the SVD of B through its QR."""
    return c.thin_gemm * 2 * q * p * width + c.gemm * 2 * q * width ** 2 + c.svd * width ** 3


def plan(shape, device: torch.device, gram_allowed: bool, c: Optional[Costs] = None,
         rank_hint: Optional[int] = None) -> Plan:
    """The path for a 2-D G of `shape` on `device`. gram_allowed: the rank rule's accuracy permits the Gram path
    (see semu_fast.ops.svd.GRAM_MAX_GAMMA); rank_hint: the hinted sketch's width, when the caller knows one."""
    c = c or costs(device)
    p, q = min(shape), max(shape)
    seconds = {"exact": c.svd * q * p * p}
    if gram_allowed:
        # the Gram, its eigendecomposition, and U = G V for about a quarter of the spectrum
        seconds["gram"] = c.gemm * q * p * p + c.eigh * p ** 3 + c.gemm * q * p * (p // 4)
    fallback = min(seconds, key=seconds.get)
    budget = seconds[fallback]
    max_rank = 0
    while max_rank + BLOCK <= p and randomized_seconds(p, q, max_rank + BLOCK, c) < budget:
        max_rank += BLOCK
    hinted = False
    if rank_hint is not None and rank_hint < p:
        seconds["hinted"] = hinted_seconds(p, q, rank_hint, c)
        hinted = seconds["hinted"] < budget
    return Plan(fallback, max_rank, seconds, hinted)
