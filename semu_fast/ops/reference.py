"""Plain-PyTorch oracles: what every op and kernel of semu_fast must compute, written for clarity, not speed.

Tests compare each fast path against these (usually after casting the inputs to float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_(accumulators: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """accumulators[i] += grads[i] (fp32 accumulators, any float grads)."""
    for acc, grad in zip(accumulators, grads):
        acc.add_(grad.to(acc.dtype))


def projection_coefficient(grad: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """c in G - c W: <G,W>/||W||^2 ("orthogonal"), <G,W>/||W|| ("official"), 0 ("none"); 0 when W = 0."""
    g, w = grad.double(), weight.double()
    dot = (g * w).sum()
    if mode == "none":
        return torch.zeros((), dtype=torch.float64, device=grad.device)
    norm_sq = (w * w).sum()
    denom = norm_sq if mode == "orthogonal" else norm_sq.sqrt()
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)


def project_perpendicular(grads: list[torch.Tensor], weights: list[torch.Tensor], mode: str = "orthogonal"
                          ) -> list[torch.Tensor]:
    """G - c W per pair, computed in float64, returned in each grad's dtype."""
    return [(g.double() - projection_coefficient(g, w, mode) * w.double()).to(g.dtype)
            for g, w in zip(grads, weights)]


def explained_variance(S: torch.Tensor) -> torch.Tensor:
    """cumsum(S^2) / sum(S^2) along the last dim, in float64 (0 where the spectrum is all zero). The total is the
    cumulative sum's last entry, so the ratios end at exactly 1 (a separate sum rounds differently: 1 + 2e-16)."""
    cumulative = S.double().square().cumsum(-1)
    total = cumulative[..., -1:] if S.shape[-1] else cumulative.sum(-1, keepdim=True)
    return cumulative / torch.where(total > 0, total, 1.0)


def select_rank(S: torch.Tensor, gamma: float, rank_rule: str = "at_least") -> torch.Tensor:
    """The rank k for each spectrum in S (..., q), by brute force over k.

    "at_least": smallest k whose explained variance is >= gamma. "official": the number of k whose explained
    variance is <= gamma (numpy searchsorted side="right"), at least 1. An all-zero spectrum gives k = 0."""
    ratios = explained_variance(S)
    flat = ratios.reshape(-1, ratios.shape[-1]).tolist()
    zero = (S.reshape(-1, S.shape[-1]) == 0).all(-1).tolist()
    ks = []
    for row, is_zero in zip(flat, zero):
        if is_zero:
            ks.append(0)
        elif rank_rule == "at_least":
            ks.append(next((i + 1 for i, r in enumerate(row) if r >= gamma), len(row)))
        else:
            ks.append(max(1, sum(1 for r in row if r <= gamma)))
    return torch.tensor(ks, dtype=torch.long).reshape(S.shape[:-1])


def svd_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVDs run in float64 for float64 input and in float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncated_svd(G: torch.Tensor, gamma: float, rank_rule: str = "at_least"):
    """Exact thin SVD (float32, or float64 for float64 input) plus the brute-force rank rule.
    G: (m, n) or (B, m, n). Returns U, S, Vh of full thin size and k (a long tensor of shape G.shape[:-2])."""
    U, S, Vh = torch.linalg.svd(G.to(svd_compute_dtype(G.dtype)), full_matrices=False)
    return U, S, Vh, select_rank(S, gamma, rank_rule)


def conv_delta_weight(U: torch.Tensor, R: torch.Tensor, Vh: torch.Tensor, kernel_size) -> torch.Tensor:
    """dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel. U (in, out, k), R (in, k, k), Vh (in, k, kh*kw)."""
    delta = torch.einsum("noa,nab,nbs->ons", U, R, Vh)
    return delta.reshape(delta.shape[0], delta.shape[1], *kernel_size)


def lowrank_linear(x, weight, U, R, Vh, bias=None):
    """The official adapter: materialise W = A + U R Vh, then a plain linear layer."""
    return F.linear(x, weight + U @ R @ Vh, bias)


def lowrank_conv2d(x, weight, U, R, Vh, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The official conv adapter: materialise A + dW, then one convolution."""
    delta = conv_delta_weight(U, R, Vh, weight.shape[2:])
    return F.conv2d(x, weight + delta, bias, stride, padding, dilation, groups)
