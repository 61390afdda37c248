"""sf.ops.truncated_svd (the rank chosen by explained variance) and sf.ops.gram_svd (thin SVDs of a batch of
matrices with few columns): the SEMU rank rules and the paths of truncated_svd: exact (torch.linalg.svd), gram (the
eigendecomposition of the smaller Gram matrix), randomized (the adaptive range finder of semu_fast.ops.range_finder)
and, for conv batches, the gram_svd kernel. semu_fast.ops.svd_plan chooses among them by measured cost.

gram_svd backends: C++ (CPU: float64 Gram + LAPACK syevd) and CUDA (one block per matrix) in csrc/, torch."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch

from .._checks import KERNEL_FLOATS, check_choice, check_gamma, check_positive_int
from ._library import Kernel
from .._profile import annotate
from . import svd_plan
from .range_finder import orth, range_finder, wide_svd

RANK_RULES = ("at_least", "official")
# The floor of the "official" rule: 1 as the official classification code (max(1, k)), 0 as the official DDPM and SD
# code (its searchsorted alone: a matrix whose first direction already explains more than gamma keeps none).
MIN_RANKS = (0, 1)
METHODS = ("auto", "exact", "gram", "randomized")
# Below this min(m, n) a full SVD costs about as much as a few randomized blocks: "auto" skips the randomized path.
RANDOMIZED_MIN_DIM = 256
# Randomized path: block width, power iterations per block, and (method="randomized") when to give up for the exact
# SVD: a basis wider than this share of min(m, n) costs about what the full SVD does. "auto" sets that cap from
# the measured cost model instead.
BLOCK, POWER_ITERS, MAX_RANK_SHARE = svd_plan.BLOCK, 2, 0.25
# The Gram path's eigenvalues carry an absolute error of about p * eps(float32) * sigma_max^2 (p = min(m, n)), which
# is below 1e-3 of the energy for p <= 8192 only when nearly all the energy sits in few directions; the kept energy
# is measured exactly afterwards, so the rank can only come out short by the error near the cut. Above this gamma
# the tail it must resolve is too thin: truncated_svd uses the other paths.
GRAM_MAX_GAMMA = 0.999
# The randomized paths decide the rank from float32 energies of a partial basis: past this gamma their rounding
# (~1e-7 of the total) can move k anywhere (a rank-20 G came out k = 64 at gamma 0.9999999); exact runs instead.
RANDOMIZED_MAX_GAMMA = 0.9999
ENERGY_SAFE = (1e-30, 1e30)  # ||G||_F^2 outside: G is scaled first (_in_safe_range)
# The hinted path (truncated_svd's rank_hint): basis columns beyond the hint, and how small the energy left outside
# the basis must be against the last kept direction's for a sketch to stand on it (the rank is then the exact one or
# one more); after the power iteration a rank bound may accept it too (within max(1, 1%) of exact: see _hinted).
HINT_OVERSAMPLING, HINT_RESIDUAL = 16, 0.1
GRAM_SVD_MAX_N = 64  # csrc/gram_svd.h: kGramSvdMaxN
GRAM_SVD_REL_TOL = 1e-7  # csrc/gram_svd.h: kGramSvdRelTol
GRAM_SVD_MAX_ENTRY = 1e150  # a Gram entry, a sum of m products of two entries, stays inside float64
GRAM_SVD_SCHEMA = "gram_svd(Tensor G) -> (Tensor U, Tensor S, Tensor Vh)"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the SVDs and the conv adapter's deltas compute in: float64 for float64 input, float32 for every narrower
    float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_gradient_matrices(G: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (in, out, kh*kw) view: one matrix per input channel, as the official code splits it."""
    return G.flatten(2).transpose(0, 1)


# ---- gram_svd ------------------------------------------------------------------------------------------------------

def _check_gram_svd(G):
    if not isinstance(G, torch.Tensor) or G.dim() != 3 or G.dtype not in KERNEL_FLOATS \
            or not 1 <= G.shape[-1] <= GRAM_SVD_MAX_N or G.shape[1] < 1:
        what = f"{G.dtype} of shape {tuple(G.shape)}" if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"gram_svd: G must be a floating (B, m, n) tensor with m >= 1 and 1 <= n <= "
                         f"{GRAM_SVD_MAX_N}, got {what}")


def _gram_svd_torch(G):
    """gram_svd in composed torch, by the kernels' method and with their conventions: the float64 Gram matrix and
    its eigendecomposition; singular values below GRAM_SVD_REL_TOL of the largest returned as 0 with zero U columns.
    (torch.linalg.svd here measured outside the tests' tolerance on a GPU: cuSOLVER's float32 Jacobi SVD.)"""
    _check_gram_svd(G)
    G64 = G.double()
    lam, V = torch.linalg.eigh(G64.mT @ G64)
    q = min(G.shape[1], G.shape[2])
    lam, V = lam.flip(-1)[..., :q], V.flip(-1)[..., :q]  # descending
    # the kernels' sign: each V column's largest-magnitude entry (the first on ties) positive
    pivots = V.gather(-2, V.abs().argmax(-2, keepdim=True))
    V = V * torch.where(pivots < 0, -1.0, 1.0)
    sigma = lam.clamp(min=0).sqrt()
    keep = sigma > GRAM_SVD_REL_TOL * sigma[..., :1]
    sigma = sigma * keep
    U = (G64 @ V) / torch.where(keep, sigma, 1.0).unsqueeze(-2) * keep.unsqueeze(-2)
    out = compute_dtype(G.dtype)
    return U.to(out), sigma.to(out), V.mT.to(out)


def _gram_svd_fake(G):
    q = min(G.shape[1], G.shape[2])
    dtype = compute_dtype(G.dtype)
    return (G.new_empty(G.shape[0], G.shape[1], q, dtype=dtype), G.new_empty(G.shape[0], q, dtype=dtype),
            G.new_empty(G.shape[0], q, G.shape[2], dtype=dtype))


KERNELS = {"gram_svd": Kernel(GRAM_SVD_SCHEMA, fake=_gram_svd_fake, impls={"torch": _gram_svd_torch}, cpp=True)}


def gram_svd(G: torch.Tensor):
    """Thin SVDs of a batch of (m, n) matrices with small n (conv gradients per input channel: n = kh*kw <= 64),
    through each n x n Gram matrix in float64.

    G: (B, m, n), any float dtype. Returns U (B, m, q), S (B, q) descending, Vh (B, q, n), q = min(m, n), in float32
    (float64 for float64 input). Singular values below 1e-7 of a matrix's largest are returned as 0, with zero U
    columns (Gram squaring cannot resolve them; float32 could not either)."""
    _check_gram_svd(G)
    if G.numel() and not torch.compiler.is_compiling():
        peak = float(G.abs().amax())
        if not math.isfinite(peak):
            raise ValueError("gram_svd: G holds NaN or Inf values")
        if peak > GRAM_SVD_MAX_ENTRY:
            raise ValueError(f"gram_svd: G holds entries of {peak:.3g}: its float64 Gram matrix would overflow "
                             f"(entries must stay below {GRAM_SVD_MAX_ENTRY:g}; scale G first)")
    return _gram_svd_checked(G)


def _gram_svd_checked(G: torch.Tensor):
    """gram_svd of a G already checked (truncated_svd has checked and scaled it)."""
    with annotate("semu_fast.gram_svd"):
        return torch.ops.semu_fast.gram_svd(G)


# ---- rank rules ----------------------------------------------------------------------------------------------------

def oversampling(k: int) -> int:
    """Basis columns kept beyond k so that the leading k directions are accurate."""
    return 10 + k // 10


def _explained_variance(S: torch.Tensor) -> torch.Tensor:
    """cumsum(S^2) / ||S||^2 in float64, the total being the cumulative sum's last entry: then the last ratio (and
    every one after the last nonzero value) is exactly 1. With sum(S^2) as the total, its rounding differs from the
    cumulative sum's, so the last ratio came out 1 + 2e-16 (the "official" rule at gamma = 1 dropped the last
    direction) or the ratio at a rank-deficient G's rank 1 - 1e-16 (the "at_least" rule at gamma = 1 kept every
    zero direction too)."""
    cumulative = S.double().square().cumsum(-1)
    total = cumulative[..., -1:] if S.shape[-1] else cumulative.sum(-1, keepdim=True)
    return cumulative / torch.where(total > 0, total, 1.0)


def select_rank(S: torch.Tensor, gamma: float, rank_rule: str = "at_least", min_rank: int = 1) -> torch.Tensor:
    """k for each spectrum in S (..., q), sorted descending; returns a long tensor of shape S.shape[:-1].

    "at_least": the smallest k whose explained variance reaches gamma (at least 1 by construction). "official": the
    largest k whose explained variance stays <= gamma (the official searchsorted(side="right")), at least min_rank.
    All-zero spectra give k = 0."""
    ratios = _explained_variance(S)
    if rank_rule == "at_least":
        # ratios never decrease, so the count below gamma is the index of the first one that reaches it.
        k = ((ratios < gamma).sum(-1) + 1).clamp(max=S.shape[-1])
    else:
        k = (ratios <= gamma).sum(-1).clamp(min=min_rank)
    return torch.where((S == 0).all(-1), 0, k)


class TruncatedSVD(tuple):
    """(U, S, Vh) cut to k = the largest rank over the batch: U (..., m, k), S (..., k), Vh (..., k, n).

    ranks: each matrix's own k (long, shape G.shape[:-2]); total_energy: ||G||_F^2 per matrix (float64);
    captured_energy: the energy each matrix's own k captures (float64). Unpacks as U, S, Vh."""

    def __new__(cls, U, S, Vh, ranks, total_energy, captured_energy):
        out = super().__new__(cls, (U, S, Vh))
        out.ranks, out.total_energy, out.captured_energy = ranks, total_energy, captured_energy
        return out

    U = property(lambda self: self[0])
    S = property(lambda self: self[1])
    Vh = property(lambda self: self[2])


def _check_matrix(G) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() not in (2, 3):
        raise ValueError(f"G must have shape (m, n) or (B, m, n), got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating tensor (float32, float16, bfloat16, float64), got {G.dtype}")


def rank_from_partial_spectrum(S: torch.Tensor, total: float, gamma: float, rank_rule: str, complete: bool,
                               min_rank: int = 1):
    """The rank rule applied to the leading singular values S of a matrix whose ||.||_F^2 is `total`; None when
    S does not reach far enough to decide (more basis needed). complete: S is the whole spectrum."""
    if total == 0:
        return 0
    ratios = S.double().square().cumsum(-1) / total
    if rank_rule == "at_least":
        below = int((ratios < gamma).sum())
        if below < len(S):
            return below + 1
        return len(S) if complete else None
    if complete or (len(S) and ratios[-1] > gamma):
        return max(min_rank, int((ratios <= gamma).sum()))
    return None


def _gram(G: torch.Tensor, total: float, gamma: float, rank_rule: str, min_rank: int) -> Optional[TruncatedSVD]:
    """Truncated SVD of a 2-D G through the eigendecomposition of its smaller Gram matrix (float32 products, float64
    eigensolver); None when the kept energy, measured exactly, falls short of gamma (then the exact path runs)."""
    transpose = G.shape[0] < G.shape[1]  # A = G or G^T with p = min(m, n) columns: C = A^T A is p x p
    A = G.T if transpose else G
    lam, V = torch.linalg.eigh((A.T @ A).double())
    lam, V = lam.flip(-1).clamp(min=0), V.flip(-1)
    k = rank_from_partial_spectrum(lam.sqrt(), total, gamma, rank_rule, complete=True, min_rank=min_rank)
    Y = A @ V[:, :k].to(A.dtype)  # = U S, exact up to the product's rounding
    S = torch.linalg.vector_norm(Y.double(), dim=0)
    captured = S.square().sum()
    if rank_rule == "at_least" and captured < gamma * total * (1 - 1e-6):
        return None
    order = torch.argsort(S, descending=True)  # eigenvalues near each other may come out of order
    S, Y, Vk = S[order], Y[:, order], V[:, :k][:, order]
    U = (Y.double() / torch.where(S > 0, S, 1.0)).to(A.dtype)
    U, S, Vh = U, S.to(A.dtype), Vk.T.to(A.dtype)
    if transpose:
        U, Vh = Vh.T, U.T
    return TruncatedSVD(U, S, Vh, torch.tensor(k), torch.tensor(total, dtype=torch.float64), captured)


def _randomized(G: torch.Tensor, total: float, gamma: float, rank_rule: str, min_rank: int, generator,
                max_rank: int) -> Optional[TruncatedSVD]:
    """Randomized truncated SVD of a 2-D G with ||G||_F^2 = total; None when it would need a basis wider than
    max_rank (a spectrum too flat for it)."""
    transpose = G.shape[0] > G.shape[1]  # keep the basis in the smaller dimension: cheaper QRs
    A = G.T if transpose else G
    p = A.shape[0]

    def columns_needed(S, l):
        k = rank_from_partial_spectrum(S, total, gamma, rank_rule, complete=l >= p, min_rank=min_rank)
        return None if k is None else max(0, min(p, k + oversampling(k)) - l)

    found = range_finder(A, columns_needed, gamma * total, BLOCK, POWER_ITERS, max_rank, generator)
    if not found.converged:
        return None
    Ub, S, Vh = wide_svd(found.B)
    # S is the whole spectrum only when the basis spans all p directions; otherwise a rank this S cannot settle
    # (its rounding differs from the range finder's) goes to the exact SVD.
    k = rank_from_partial_spectrum(S, total, gamma, rank_rule, complete=found.U.shape[1] >= p, min_rank=min_rank)
    if k is None:
        return None
    return _from_basis(found.U, Ub, S, Vh, k, total, transpose)


def _from_basis(Q, Ub, S, Vh, k, total, transpose) -> TruncatedSVD:
    """The rank-k truncation from the SVD Ub S Vh of B = Q^T A (A = G, or G^T when transpose)."""
    U, S, Vh = Q @ Ub[:, :k], S[:k], Vh[:k]
    if transpose:
        U, Vh = Vh.T, U.T
    captured = S.double().square().sum()
    return TruncatedSVD(U, S, Vh, torch.tensor(k), torch.tensor(total, dtype=torch.float64), captured)


def _hinted(G: torch.Tensor, total: float, gamma: float, rank_rule: str, min_rank: int, generator,
            rank_hint: int) -> Optional[TruncatedSVD]:
    """Truncated SVD of a 2-D G whose rank is about rank_hint at most (a Linear's gradient summed over T input rows
    has rank <= T; the projection adds a small full-rank part): one sketch of rank_hint + HINT_OVERSAMPLING columns,
    two wide products in all. The energy outside the basis is known exactly (||G||_F^2 - ||Q^T G||_F^2 = m). The
    sketch stands when m is too small to move the rank by more than one (HINT_RESIDUAL of the last kept direction's
    energy); else one power iteration follows, whose result stands by that test or by a bound: the basis's leading
    energies are at most G's and at least G's minus m, so its rank k is at least the exact one, and the exact one at
    least the basis's rank at gamma - m / ||G||_F^2; within max(1, 1%) of k, k stands (with rank_rule "at_least" the
    captured variance reaches gamma by construction). Else None (the hint was wrong: the caller's other paths
    run)."""
    transpose = G.shape[0] > G.shape[1]  # the basis in the smaller dimension
    A = G.T if transpose else G
    p, q = A.shape
    width = min(p, rank_hint + HINT_OVERSAMPLING)
    Q = orth(A @ torch.randn(q, width, generator=generator, device=A.device, dtype=A.dtype))
    for iteration in range(2):
        if iteration:
            Q = orth(A @ B.T)  # one power iteration: (A A^T) Q
        B = Q.T @ A
        missing = total - float(torch.linalg.vector_norm(B, dim=-1).double().square().sum())
        Ub, S, Vh = wide_svd(B)
        k = rank_from_partial_spectrum(S, total, gamma, rank_rule, complete=True, min_rank=min_rank)
        if k == 0 or (k < width and missing <= HINT_RESIDUAL * float(S[k - 1].double().square())):
            return _from_basis(Q, Ub, S, Vh, k, total, transpose)
        if missing > (1 - gamma) * total:  # the basis misses more than the rank rule leaves out: hint too small
            return None
        if iteration and k < width:  # a flat tail (many directions share m): the rank bound decides
            lowest = rank_from_partial_spectrum(S, total, gamma - max(missing, 0.0) / total, rank_rule,
                                                complete=True, min_rank=min_rank)
            if k - lowest <= max(1, k // 100):
                return _from_basis(Q, Ub, S, Vh, k, total, transpose)
    return None


def truncated_svd(G: torch.Tensor, gamma: float, rank_rule: str = "at_least", method: str = "auto",
                  generator: Optional[torch.Generator] = None, min_rank: int = 1,
                  rank_hint: Optional[int] = None) -> TruncatedSVD:
    """Truncated SVD of G keeping the rank that explains gamma of ||G||_F^2.

    G: (m, n) or (B, m, n), any float dtype; computed in float32 (float64 for float64 input).
    Returns TruncatedSVD: U (..., m, k), S (..., k), Vh (..., k, n) in the compute dtype, with .ranks per matrix.
    method: "exact" (torch.linalg.svd); "gram" (2-D: the eigendecomposition of the smaller Gram matrix, for gamma <=
    GRAM_MAX_GAMMA; a batch with n <= 64: the gram_svd kernel, other batches exact); "randomized" (adaptive range
    finder, 2-D only, gamma <= RANDOMIZED_MAX_GAMMA; exact on flat spectra or past that gamma); "auto": batches with
    n <= 64 take gram_svd up to GRAM_MAX_GAMMA, other batches exact; a 2-D G with min(m, n) >= 256 takes the
    randomized path with its basis capped where it would cost more than the cheaper of gram and exact, then that one
    (costs measured on this device, semu_fast.ops.svd_plan); a smaller one the exact SVD. generator seeds the
    randomized path (same seed, same device, same calibration: same result). min_rank: the "official" rule's floor,
    1 or 0 (the official DDPM/SD code: a matrix whose first direction explains more than gamma keeps k = 0).
    rank_hint (2-D G, methods "auto" and "randomized"): about how high G's rank can be, as a Linear layer's gradient
    summed over T input rows has rank <= T (sf.prepare passes the rows each layer saw); when it is well below min(m,
    n), one sketch of that width replaces the adaptive blocks (checked afterwards by the energy it leaves out, so a
    wrong hint costs time, never accuracy).
    """
    gamma = check_gamma("gamma", gamma)
    check_choice("rank_rule", rank_rule, RANK_RULES)
    check_choice("method", method, METHODS)
    min_rank = check_min_rank(min_rank)
    _check_matrix(G)
    if method == "randomized" and G.dim() != 2:
        raise ValueError(f"method='randomized' needs a 2-D G, got shape {tuple(G.shape)}")
    if rank_hint is not None:
        check_positive_int("rank_hint", rank_hint, optional=True)
        if G.dim() != 2:
            raise ValueError(f"rank_hint applies to a 2-D G, got shape {tuple(G.shape)}")
    # Under the caller's autocast the range finder's and the Gram route's products would run in half precision.
    with annotate("semu_fast.truncated_svd"), torch.autocast(G.device.type, enabled=False):
        return _truncated_svd(G.to(compute_dtype(G.dtype)), gamma, rank_rule, min_rank, method, generator,
                              rank_hint)


def check_min_rank(min_rank) -> int:
    """0 or 1 as a Python int (numpy's integers included; 1.0 and True are refused: a float or a numpy scalar kept
    as given made the ranks floats, and the config unwritable as JSON when the adapters were saved)."""
    if isinstance(min_rank, bool) or not isinstance(min_rank, numbers.Integral) or min_rank not in MIN_RANKS:
        raise ValueError(f"min_rank must be 0 or 1 (an int), got {min_rank!r}")
    return int(min_rank)


def _gram_ok(shape, gamma: float) -> bool:
    return gamma <= GRAM_MAX_GAMMA and min(shape) > 0


def _hint_width(shape, rank_hint: Optional[int]) -> Optional[int]:
    """The hinted sketch's width, or None when there is no hint or the sketch would not be narrower than G."""
    if rank_hint is None or rank_hint + HINT_OVERSAMPLING >= min(shape):
        return None
    return rank_hint + HINT_OVERSAMPLING


def auto_plan(shape, device: torch.device, gamma: float, rank_hint: Optional[int] = None) -> svd_plan.Plan:
    """The plan truncated_svd(method="auto") follows for a nonzero 2-D G of `shape` (each side at least
    RANDOMIZED_MIN_DIM) on `device`, with this gamma and rank_hint."""
    plan = svd_plan.plan(shape, device, _gram_ok(shape, gamma), rank_hint=_hint_width(shape, rank_hint))
    return plan if gamma <= RANDOMIZED_MAX_GAMMA else dataclasses.replace(plan, max_rank=0, hinted=False)


def _energy(G: torch.Tensor) -> float:
    # Row norms, then a float64 sum: as fast as a plain fp32 norm, whose single accumulator loses ~1e-2 relative on
    # 4096 x 11008.
    return float(torch.linalg.vector_norm(G, dim=-1).double().square().sum()) if G.numel() else 0.0


def _in_safe_range(G: torch.Tensor):
    """(G times 2**exponent, exponent, ||.||_F^2 of the scaled G). The exponent is 0 unless G's energy leaves
    [1e-30, 1e30], where float32 squares and Gram products overflow or underflow (a finite G of 1e20 entries read as
    Inf, one of 1e-30 entries as 0): then G's largest entry is brought into [0.5, 1). Ranks are scale-free and a
    power of two scales exactly; NaN or Inf in G is a ValueError."""
    total = _energy(G)
    if ENERGY_SAFE[0] < total < ENERGY_SAFE[1]:
        return G, 0, total
    peak = float(G.abs().amax()) if G.numel() else 0.0
    if not math.isfinite(peak):
        raise ValueError("G holds NaN or Inf values")
    if peak == 0:
        return G, 0, 0.0
    exponent = -math.frexp(peak)[1]
    G = _times_power_of_two(G, exponent)
    return G, exponent, _energy(G)


def _times_power_of_two(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t * 2**exponent in factors of at most 2**100, each representable in float32 (a subnormal float32 G needs
    2**128 and more, which float32 cannot hold)."""
    while exponent:
        step = max(-100, min(100, exponent))
        t = t * 2.0 ** step
        exponent -= step
    return t


def _rescaled(result: TruncatedSVD, exponent: int) -> TruncatedSVD:
    """A result computed on G * 2**exponent, for G."""
    if exponent == 0:
        return result
    U, S, Vh = result
    return TruncatedSVD(U, _times_power_of_two(S, -exponent), Vh, result.ranks,
                        _times_power_of_two(result.total_energy, -2 * exponent),
                        _times_power_of_two(result.captured_energy, -2 * exponent))


def _truncated_svd(G, gamma, rank_rule, min_rank, method, generator, rank_hint=None) -> TruncatedSVD:
    G, exponent, total = _in_safe_range(G)
    return _rescaled(_truncated_svd_of_safe(G, total, gamma, rank_rule, min_rank, method, generator, rank_hint),
                     exponent)


def _truncated_svd_of_safe(G, total, gamma, rank_rule, min_rank, method, generator, rank_hint) -> TruncatedSVD:
    if G.dim() == 3:  # a batch: the gram_svd kernel where its n fits (and the matrices are not empty), else exact
        fits = 1 <= G.shape[-1] <= GRAM_SVD_MAX_N and G.shape[1] >= 1
        if method == "gram" and fits and gamma > GRAM_MAX_GAMMA:
            raise ValueError(f"method='gram' resolves gamma <= {GRAM_MAX_GAMMA} only, got {gamma}")
        # Past GRAM_MAX_GAMMA the kept tail reaches the kernel's cut-off (GRAM_SVD_REL_TOL), as on the 2-D path
        if method in ("auto", "gram") and fits and gamma <= GRAM_MAX_GAMMA:
            return _truncate(*_gram_svd_checked(G), gamma, rank_rule, min_rank)
        return _truncate(*torch.linalg.svd(G, full_matrices=False), gamma, rank_rule, min_rank)
    result = None
    gram_ok = _gram_ok(G.shape, gamma)
    if method == "gram" and not gram_ok and min(G.shape) > 0:  # an empty G needs no path: exact returns it
        raise ValueError(f"method='gram' resolves gamma <= {GRAM_MAX_GAMMA} only, got {gamma}")
    fallback = {"gram": "gram" if gram_ok else "exact", "randomized": "exact", "exact": "exact"}.get(method)
    hinted = _hint_width(G.shape, rank_hint) is not None and total > 0
    if method == "randomized" and gamma <= RANDOMIZED_MAX_GAMMA:
        if hinted:
            result = _hinted(G, total, gamma, rank_rule, min_rank, generator, rank_hint)
        if result is None:
            cap = max(BLOCK, int(MAX_RANK_SHARE * min(G.shape)))
            result = _randomized(G, total, gamma, rank_rule, min_rank, generator, cap)
    elif method == "auto" and min(G.shape) >= RANDOMIZED_MIN_DIM:  # smaller: the exact SVD costs next to nothing
        plan = auto_plan(G.shape, G.device, gamma, rank_hint if total > 0 else None)
        fallback = plan.fallback
        if plan.hinted:
            result = _hinted(G, total, gamma, rank_rule, min_rank, generator, rank_hint)
        if result is None and plan.max_rank > 0:
            result = _randomized(G, total, gamma, rank_rule, min_rank, generator, plan.max_rank)
    if result is None and fallback == "gram":
        result = _gram(G, total, gamma, rank_rule, min_rank)
    if result is None:
        result = _truncate(*torch.linalg.svd(G, full_matrices=False), gamma, rank_rule, min_rank)
    return result


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, gamma: float, rank_rule: str,
              min_rank: int) -> TruncatedSVD:
    """Cut a full thin SVD to the rank rule's k (the largest over the batch)."""
    ranks = select_rank(S, gamma, rank_rule, min_rank)
    energy = S.double().square()
    total = energy.sum(-1)
    keep = torch.arange(S.shape[-1], device=S.device) < ranks.unsqueeze(-1).to(S.device)
    captured = (energy * keep).sum(-1)
    k = int(ranks.max()) if ranks.numel() else 0
    return TruncatedSVD(U[..., :k], S[..., :k], Vh[..., :k, :], ranks, total, captured)
