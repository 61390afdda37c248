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
from .ops.svd import compute_dtype


class SEMUAdapter(nn.Module):
    """Base of the Linear, Conv1D, per-column Linear and Conv2d adapters. U and Vh are float32 buffers, R a float32
    zero-initialised Parameter (float64 after .double(), and when loaded from adapters saved so).

    rank: k (the size of R); ranks: for conv and per-column layers, each input channel's (column's) own k (U's
    columns and Vh's rows beyond it are zero).
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
        self._merge_after_load: Optional[str] = None  # "copy" or "assign": how a load into a merged adapter ran
        # A state dict holds the unmerged weight whether or not the adapter is merged (merging is a faster forward,
        # not another model), and loading one into a merged adapter merges the loaded weight and R.
        self._register_state_dict_hook(_unmerged_state_dict)
        self._register_load_state_dict_pre_hook(_unmerge_before_load, with_module=True)
        self.register_load_state_dict_post_hook(_merge_after_load)

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
        """R entries that can move: k*k for Linear, sum of each channel's (column's) k^2 for conv (per-column)."""
        if self.ranks is None:
            return self.R.numel()
        return int(sum(k * k for k in self.ranks))

    @torch.no_grad()
    def nonfinite_factors(self) -> list[str]:
        """The names of the factors (R, U, Vh) holding NaN or Inf: what merging, saving or exporting would carry
        into the weights or a file."""
        return [part for part in ("R", "U", "Vh") if not torch.isfinite(getattr(self, part)).all()]

    @torch.no_grad()
    def merge(self) -> None:
        """Write A + dW into the base weight (in its dtype), keeping A to unmerge exactly. Merging a merged adapter
        writes A + dW again, from the current R (it may have changed since)."""
        weight = self.base_layer.weight
        if self.disabled:
            raise RuntimeError("cannot merge the adapters inside disable_adapters(): the block runs the original "
                               "model; merge after it")
        if distributed.is_sharded(weight):
            raise RuntimeError("cannot merge into an FSDP-sharded weight: keep the adapters unmerged (they train and "
                               "run as they are), or gather a full state dict into an unsharded model and merge there")
        bad = self.nonfinite_factors()
        if bad:
            raise FloatingPointError(f"cannot merge: the adapter's {', '.join(bad)} hold NaN or Inf, which would be "
                                     f"written into the base weight")
        original = self._original_weight if self.merged else weight.detach().clone()
        weight.copy_(self.merged_weight(original))
        self._original_weight, self.merged = original, True

    @torch.no_grad()
    def merged_weight(self, original: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A + dW in the base weight's dtype, as merge writes it (A: the unmerged weight, by default this layer's)."""
        if original is None:
            original = self._original_weight if self.merged else self.base_layer.weight.detach()
        exact = torch.promote_types(torch.float32, torch.promote_types(original.dtype, self.R.dtype))  # float64 stays
        return (original.to(exact) + self.delta_weight().to(exact)).to(original.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back bit for bit."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def _apply(self, fn, recurse=True):
        # The base weight kept for unmerge moves with the module (.to(), .cuda(), .cpu()); it keeps its dtype, the
        # one unmerge gives back.
        module = super()._apply(fn, recurse)
        if self._original_weight is not None:
            self._original_weight = self._original_weight.to(self.base_layer.weight.device)
        return module

    def forward(self, *args, **kwargs):  # the input by position or by the base layer's own name (input=, x=)
        if self.merged or self.disabled:
            return self.base_layer(*args, **kwargs)
        if len(args) + len(kwargs) != 1:
            raise TypeError(f"{type(self).__name__} takes one input, got {len(args)} positional and keyword "
                            f"argument(s) {sorted(kwargs)}")
        return self.adapted_forward(*args, *kwargs.values())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, merged={self.merged}, disabled={self.disabled}"


def _unmerged_state_dict(adapter: SEMUAdapter, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "base_layer.weight"
    if adapter.merged and key in state_dict:  # in the weight's dtype (the kept copy keeps its own across a cast)
        state_dict[key] = adapter._original_weight.to(adapter.base_layer.weight.dtype)


def _unmerge_before_load(adapter: SEMUAdapter, state_dict, prefix, local_metadata, *args) -> None:
    if adapter.merged:
        adapter.unmerge()
        adapter._merge_after_load = "assign" if local_metadata.get("assign_to_params_buffers") else "copy"


def _merge_after_load(adapter: SEMUAdapter, incompatible_keys) -> None:
    if adapter._merge_after_load:
        if adapter._merge_after_load == "assign":  # the weight is now the caller's tensor: merge into a copy
            weight = adapter.base_layer.weight
            weight.data = weight.data.clone()
        adapter._merge_after_load = None
        adapter.merge()


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


def mask_ranks(U: torch.Tensor, Vh: torch.Tensor, ranks) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """U (B, m, k) and Vh (B, k, n) with matrix b's columns / rows past ranks[b] zeroed, so that R[b] acts only
    through its top-left ranks[b] x ranks[b] block (the official gradient mask, without a hook), and the ranks as
    ints."""
    keep = torch.arange(U.shape[-1], device=U.device) < torch.as_tensor(ranks, device=U.device).unsqueeze(-1)
    return U * keep.unsqueeze(1).to(U.dtype), Vh * keep.unsqueeze(-1).to(Vh.dtype), [int(r) for r in ranks]


class SEMUColumnLinear(SEMUAdapter):
    """nn.Linear split per input column, as the official DDPM splits its 1x1-conv attention (q, k, v, proj_out):
    column n of the weight gets its own correction dW[:, n] = U[n] R[n] Vh[n]. U: (in, out, k), R: (in, k, k),
    Vh: (in, k, 1), k <= 1: about `in` trainable entries, where a full-rank one-matrix adapter of a C x C
    projection has C^2. A column with ranks[n] = 0 has zero U[n] and Vh[n]: its R[n] moves nothing.

    dW has full rank in general, so the forward forms A + dW (in float32, float64 for float64 input) and runs one
    F.linear; autograd carries R's gradient through that sum."""

    kind = "column_linear"

    def __init__(self, base_layer: nn.Linear, U: torch.Tensor, Vh: torch.Tensor, ranks):
        U, Vh, ranks = mask_ranks(U, Vh, ranks)
        k = U.shape[-1]
        super().__init__(base_layer, U, Vh, (U.shape[0], k, k), ranks)

    def delta_weight(self) -> torch.Tensor:
        return conv_delta_weight(self.U, self.R, self.Vh, (1, 1)).flatten(1)  # the 1x1 conv's delta, (out, in)

    def adapted_forward(self, x):
        base = self.base_layer
        ct = compute_dtype(x.dtype)
        delta = conv_delta_weight(self.U.to(ct), self.R.to(ct), self.Vh.to(ct), (1, 1)).flatten(1)
        weight = (base.weight.to(ct) + delta).to(x.dtype)
        return F.linear(x, weight, None if base.bias is None else base.bias.to(x.dtype))


class SEMUConv2d(SEMUAdapter):
    """conv(x, A + dW), dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel. U: (in, out, k), R: (in, k, k),
    Vh: (in, k, kh*kw). With per-channel ranks, U's columns and Vh's rows past a channel's k are zero, so R[n]
    acts only through its top-left k_n x k_n block (the official gradient mask, without a hook)."""

    kind = "conv2d"

    def __init__(self, base_layer: nn.Conv2d, U: torch.Tensor, Vh: torch.Tensor, ranks=None):
        k = U.shape[-1]
        if ranks is not None:
            U, Vh, ranks = mask_ranks(U, Vh, ranks)
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
