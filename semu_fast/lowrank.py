"""The SEMU adapter's math, composed from PyTorch ops: y = layer(x; A + U R Vh) without forming the Linear's
m x n weight. Autograd flows to x, R and (when they require it) A, U, Vh and bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_same_device, check_tensor
from .reference import conv_delta_weight


def _check_factors(weight, U, R, Vh, bias, batched: bool):
    lead = 1 if batched else 0
    check_tensor("U", U, dims=(2 + lead,))
    check_tensor("R", R, dims=(2 + lead,))
    check_tensor("Vh", Vh, dims=(2 + lead,))
    k = R.shape[-1]
    if R.shape[-2] != k:
        raise ValueError(f"R must be square in its last two dims, got shape {tuple(R.shape)}")
    if U.shape[-1] != k or Vh.shape[-2] != k:
        raise ValueError(f"U (..., out, k) and Vh (..., k, n) must match R's k = {k}, got U {tuple(U.shape)} and "
                         f"Vh {tuple(Vh.shape)}")
    if U.shape[-2] != weight.shape[0]:
        raise ValueError(f"U has {U.shape[-2]} rows but weight has {weight.shape[0]} outputs")
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} outputs")


def lowrank_linear(x, weight, U, R, Vh, bias=None):
    """y = x A^T + ((x Vh^T) R^T) U^T + b, never materialising A + U R Vh.

    x: (..., in); weight A: (out, in); U: (out, k); R: (k, k); Vh: (k, in); bias: (out,) or None. Factors are cast
    to x's dtype; y has x's dtype."""
    check_tensor("x", x)
    check_tensor("weight", weight, dims=(2,))
    _check_factors(weight, U, R, Vh, bias, batched=False)
    if Vh.shape[1] != weight.shape[1] or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., in), weight (out, in) and Vh (k, in) must agree on in; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, Vh {tuple(Vh.shape)}")
    check_same_device(x=x, weight=weight, U=U, R=R, Vh=Vh, bias=bias)
    dt = x.dtype
    base = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    return base + F.linear(F.linear(F.linear(x, Vh.to(dt)), R.to(dt)), U.to(dt))


def lowrank_conv2d(x, weight, U, R, Vh, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(x, A + dW) with dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel: one convolution.

    x: (N, in, H, W) or (in, H, W); weight A: (out, in, kh, kw); U: (in, out, k); R: (in, k, k);
    Vh: (in, k, kh*kw); bias: (out,) or None. groups must be 1 (SEMU's per-input-channel split needs all of W)."""
    if groups != 1:
        raise ValueError(f"groups must be 1 for the SEMU conv adapter, got {groups}")
    check_tensor("x", x, dims=(3, 4))
    check_tensor("weight", weight, dims=(4,))
    _check_factors(weight, U, R, Vh, bias, batched=True)
    out, cin, kh, kw = weight.shape
    if U.shape[0] != cin or R.shape[0] != cin or Vh.shape[0] != cin or Vh.shape[-1] != kh * kw:
        raise ValueError(f"U (in, out, k), R (in, k, k) and Vh (in, k, kh*kw) must match weight {tuple(weight.shape)}; "
                         f"got U {tuple(U.shape)}, R {tuple(R.shape)}, Vh {tuple(Vh.shape)}")
    if x.shape[-3] != cin:
        raise ValueError(f"x has {x.shape[-3]} channels but weight expects {cin}")
    check_same_device(x=x, weight=weight, U=U, R=R, Vh=Vh, bias=bias)
    dt = x.dtype
    delta = conv_delta_weight(U.to(dt), R.to(dt), Vh.to(dt), (kh, kw))
    return F.conv2d(x, weight.to(dt) + delta, None if bias is None else bias.to(dt), stride, padding, dilation)
