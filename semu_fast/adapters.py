"""SEMU adapter modules: the frozen original layer plus W's low-rank correction U R Vh, with only R trainable.

The adapter holds the original module itself (its weight is not copied); merging writes A + dW into that weight and
keeps a copy of A so that unmerging gives it back bit for bit."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, ops
from .ops.lowrank import conv_delta_weight


class SEMUAdapter(nn.Module):
    """Base of the Linear, Conv1D and Conv2d adapters. U and Vh are float32 buffers, R a float32 zero-initialised Parameter.

    rank: k (the size of R); ranks: for conv layers, each input channel's own k (columns beyond it are zero).
    Every attribute of the base layer reads through the adapter (in_features, kernel_size, ...), as peft's LoRA
    layers do, so code that inspects layers keeps working; `weight` and `bias` are the base layer's (the weight
    without the adapter's term; the adapted weight is weight + delta_weight())."""

    def __init__(self, base_layer: nn.Module, U: torch.Tensor, Vh: torch.Tensor, R_shape, ranks=None):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.register_buffer("U", U.detach().to(device=device, dtype=torch.float32).contiguous())
        self.register_buffer("Vh", Vh.detach().to(device=device, dtype=torch.float32).contiguous())
        self.R = nn.Parameter(torch.zeros(R_shape, dtype=torch.float32, device=device))
        self.ranks = ranks
        self.merged = False
        self.disabled = False
        self._original_weight: Optional[torch.Tensor] = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # the adapter's own parameters, buffers and modules
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def rank(self) -> int:
        return self.R.shape[-1]

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def trainable_params(self) -> int:
        """R entries that can move: k*k for Linear, sum of each channel's k^2 for conv."""
        if self.ranks is None:
            return self.R.numel()
        return int(sum(k * k for k in self.ranks))

    @torch.no_grad()
    def merge(self) -> None:
        """Write A + dW into the base weight (in its dtype), keeping A to unmerge exactly."""
        if self.merged:
            return
        weight = self.base_layer.weight
        if distributed.is_sharded(weight):
            raise RuntimeError("cannot merge into an FSDP-sharded weight: keep the adapters unmerged (they train and "
                               "run as they are), or gather a full state dict into an unsharded model and merge there")
        self._original_weight = weight.detach().clone()
        weight.copy_((weight.float() + self.delta_weight().float()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back bit for bit."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base_layer(x)
        return self.adapted_forward(x)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, merged={self.merged}, disabled={self.disabled}"


class SEMULinear(SEMUAdapter):
    """y = x A^T + ((x Vh^T) R^T) U^T + b. U: (out, k), R: (k, k), Vh: (k, in)."""

    kind = "linear"

    def __init__(self, base_layer: nn.Linear, U: torch.Tensor, Vh: torch.Tensor):
        super().__init__(base_layer, U, Vh, (U.shape[-1], U.shape[-1]))

    def delta_weight(self) -> torch.Tensor:
        return self.U @ self.R @ self.Vh

    def adapted_forward(self, x):
        base = self.base_layer
        return ops.lowrank_linear(x, base.weight, self.U, self.R, self.Vh, base.bias)


class SEMUConv1D(SEMULinear):
    """transformers' Conv1D (weight A stored as (in, out)): the same adapter as SEMULinear on the (out, in) view A^T,
    so U: (out, k), R: (k, k), Vh: (k, in), and dW = (U R Vh)^T in the stored layout."""

    kind = "conv1d"

    def delta_weight(self) -> torch.Tensor:
        return (self.U @ self.R @ self.Vh).T

    def adapted_forward(self, x):
        base = self.base_layer
        return ops.lowrank_linear(x, base.weight.T, self.U, self.R, self.Vh, base.bias)


class SEMUConv2d(SEMUAdapter):
    """conv(x, A + dW), dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel. U: (in, out, k), R: (in, k, k),
    Vh: (in, k, kh*kw). With per-channel ranks, U's columns and Vh's rows past a channel's k are zero, so R[n]
    acts only through its top-left k_n x k_n block (the official gradient mask, without a hook)."""

    kind = "conv2d"

    def __init__(self, base_layer: nn.Conv2d, U: torch.Tensor, Vh: torch.Tensor, ranks=None):
        k = U.shape[-1]
        if ranks is not None:
            keep = torch.arange(k, device=U.device) < torch.as_tensor(ranks, device=U.device).unsqueeze(-1)
            U = U * keep.unsqueeze(1).to(U.dtype)
            Vh = Vh * keep.unsqueeze(-1).to(Vh.dtype)
            ranks = [int(r) for r in ranks]
        super().__init__(base_layer, U, Vh, (U.shape[0], k, k), ranks)

    def delta_weight(self) -> torch.Tensor:
        return conv_delta_weight(self.U, self.R, self.Vh, self.base_layer.kernel_size)

    def adapted_forward(self, x):
        base = self.base_layer
        padding = base.padding
        if base.padding_mode != "zeros":  # reflect/replicate/circular: pad as nn.Conv2d does, then convolve unpadded
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        return ops.lowrank_conv2d(x, base.weight, self.U, self.R, self.Vh, base.bias, base.stride, padding,
                                  base.dilation)
