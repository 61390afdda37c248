"""Truncated SVD with the rank chosen by explained variance: the SEMU rank rules and the exact path."""
from __future__ import annotations

from typing import Optional

import torch

from .config import RANK_RULES, _check_choice, _check_gamma
from .reference import explained_variance, svd_compute_dtype

METHODS = ("auto", "exact")


def select_rank(S: torch.Tensor, gamma: float, rank_rule: str = "at_least") -> torch.Tensor:
    """k for each spectrum in S (..., q), sorted descending; returns a long tensor of shape S.shape[:-1].

    "at_least": the smallest k whose explained variance reaches gamma. "official": the largest k whose explained
    variance stays <= gamma, at least 1 (the official searchsorted(side="right")). All-zero spectra give k = 0."""
    ratios = explained_variance(S)
    if rank_rule == "at_least":
        # ratios never decrease, so the count below gamma is the index of the first one that reaches it.
        k = ((ratios < gamma).sum(-1) + 1).clamp(max=S.shape[-1])
    else:
        k = (ratios <= gamma).sum(-1).clamp(min=1)
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
    if G.numel() and not torch.isfinite(G).all():
        raise ValueError("G holds NaN or Inf values")


def truncated_svd(G: torch.Tensor, gamma: float, rank_rule: str = "at_least", method: str = "auto",
                  generator: Optional[torch.Generator] = None) -> TruncatedSVD:
    """Truncated SVD of G keeping the rank that explains gamma of ||G||_F^2.

    G: (m, n) or (B, m, n), any float dtype; computed in float32 (float64 for float64 input).
    Returns TruncatedSVD: U (..., m, k), S (..., k), Vh (..., k, n) in the compute dtype, with .ranks per matrix.
    method: "auto" or "exact" (both exact for now; generator is reserved for randomized methods)."""
    gamma = _check_gamma("gamma", gamma)
    _check_choice("rank_rule", rank_rule, RANK_RULES)
    _check_choice("method", method, METHODS)
    _check_matrix(G)
    U, S, Vh = torch.linalg.svd(G.to(svd_compute_dtype(G.dtype)), full_matrices=False)
    ranks = select_rank(S, gamma, rank_rule)
    energy = S.double().square()
    total = energy.sum(-1)
    keep = torch.arange(S.shape[-1], device=S.device) < ranks.unsqueeze(-1).to(S.device)
    captured = (energy * keep).sum(-1)
    k = int(ranks.max()) if ranks.numel() else 0
    return TruncatedSVD(U[..., :k], S[..., :k], Vh[..., :k, :], ranks, total, captured)
