"""Adaptive randomized range finder with an explained-variance stop, after Yu, Gu and Li's randQB_EI (2018).

The basis Q grows block by block; B = Q^T A is kept alongside, so the captured energy ||B||_F^2 (and with it the
explained variance of the best rank-k subspace inside span(Q)) is known without touching A again. Power iterations
run on the residual A - Q B, so each new block looks for directions the basis does not have yet."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RangeFinderResult:
    U: torch.Tensor         # (m, l): orthonormal basis of the approximate range
    B: torch.Tensor         # (l, n): U^T A
    converged: bool         # False: the basis would have grown past max_rank (a flat spectrum)


def orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def wide_svd(B: torch.Tensor, compute_uv: bool = True):
    """SVD of a wide B (l, n), l <= n, through the QR of B^T: LAPACK's SVD of the small l x l factor instead of the
    whole (measured 4-5x faster at 528 x 5632 on a CPU). Returns (U, S, Vh) with Vh (l, n), or S alone."""
    if B.shape[1] < 2 * B.shape[0]:
        return torch.linalg.svd(B, full_matrices=False) if compute_uv else torch.linalg.svdvals(B)
    if not compute_uv:
        return torch.linalg.svdvals(torch.linalg.qr(B.T, mode="r").R)
    Qb, R = torch.linalg.qr(B.T, mode="reduced")
    U, S, Vh = torch.linalg.svd(R.T)
    return U, S, Vh @ Qb.T


def _orth_against(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of Y with span(Q) removed; two Gram-Schmidt passes ("twice is enough") for fp32."""
    if Q.shape[1]:
        Y = Y - Q @ (Q.T @ Y)
        Y = Y - Q @ (Q.T @ Y)
    return orth(Y)


def predicted_columns(S: torch.Tensor, missing: float, room: int) -> int:
    """An estimate of how many more directions it takes to capture `missing` energy, from the leading singular
    values S found so far. Each new direction holds at most S[-1]^2, so missing / S[-1]^2 is a floor (optimistic);
    continuing the decay of the second half of S (a straight line in log S^2) gives an extrapolation, pessimistic
    while few values are known (gradient spectra fall slowly first, then faster). Their geometric mean came within
    10% of the truth from the first 64 values on gradients of 512-2048 tokens (benchmarks/RESULTS.md). Returns more
    than `room` when even all the directions left would not do."""
    if missing <= 0:
        return 0
    energy = S.detach().double().square().cpu()  # a few thousand values, read one by one below
    if len(energy) == 0 or energy[-1] <= 0:
        return room + 1
    floor = math.ceil(missing / float(energy[-1]))
    tail = energy[len(energy) // 2:]
    if floor > room:
        return room + 1
    if len(tail) < 4:
        return floor
    steps = torch.arange(len(tail), dtype=torch.float64)
    slope = float(torch.cov(torch.stack([steps, tail.log()]))[0, 1] / steps.var())  # least squares: log S^2 vs i
    ratio = math.exp(min(slope, 0.0))  # each next direction keeps this share of the previous one's energy
    extrapolated = room + 1
    if ratio >= 1.0 - 1e-9:  # no decay to continue: the floor is the estimate
        return floor
    reachable = float(energy[-1]) * ratio / (1.0 - ratio)
    if reachable > missing:  # energy[-1] * (ratio + ratio^2 + ... + ratio^j) >= missing
        extrapolated = min(extrapolated, math.ceil(
            math.log(1.0 - missing * (1.0 - ratio) / (float(energy[-1]) * ratio)) / math.log(ratio)))
    return max(floor, math.ceil(math.sqrt(floor * max(floor, extrapolated))))


def _round_width(b: int) -> int:
    return max(16, -(-b // 8) * 8)


def range_finder(A: torch.Tensor, columns_needed, target_energy: float, block: int, power_iters: int,
                 max_rank: int, generator: Optional[torch.Generator] = None) -> RangeFinderResult:
    """Grow Q (m, l) for A (m, n) until the basis suffices, or until l would pass max_rank (then converged=False
    and the caller should use an exact SVD).

    columns_needed(S, l) -> int or None is asked after every block, S being the singular values of B = Q^T A: 0
    when the basis suffices, the number of columns still wanted, or None when the spectrum cannot tell yet (it
    holds the rank rule and the oversampling policy). target_energy: the energy the kept subspace must reach
    (gamma ||A||_F^2); with the spectrum found so far it predicts the columns still needed (predicted_columns),
    which size the next block and trigger the early give-up."""
    m, n = A.shape
    Q = A.new_empty(m, 0)
    B = A.new_empty(0, n)
    b = block
    while True:
        l = Q.shape[1]
        b = min(b, min(m, n) - l)
        if b <= 0:
            return RangeFinderResult(Q, B, True)
        if l + b > max_rank:
            return RangeFinderResult(Q, B, False)
        omega = torch.randn(n, b, generator=generator, device=A.device, dtype=A.dtype)
        Y = _orth_against(A @ omega - Q @ (B @ omega), Q)
        for _ in range(power_iters):
            # (Y^T A)^T rather than A^T Y: the same product, but it streams A along its rows.
            Z = orth((Y.T @ A).T - B.T @ (Q.T @ Y))
            Y = _orth_against(A @ Z - Q @ (B @ Z), Q)
        B_new = Y.T @ A
        Q = torch.cat([Q, Y], dim=1)
        B = torch.cat([B, B_new], dim=0)
        S = wide_svd(B, compute_uv=False)
        needed = columns_needed(S, Q.shape[1])
        if needed == 0:
            return RangeFinderResult(Q, B, True)
        if needed is None:
            missing = target_energy - float(S.double().square().sum())
            estimate = predicted_columns(S, missing, min(m, n) - Q.shape[1])
            if Q.shape[1] + estimate > max_rank:  # too flat for this method: give up now, not blocks later
                return RangeFinderResult(Q, B, False)
            needed = max(block, estimate)
        # Every block costs a few full passes over A whatever its width, so size it to what is still needed.
        b = min(_round_width(needed), 2 * block)
