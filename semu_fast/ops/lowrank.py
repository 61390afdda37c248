"""The SEMU adapter ops: y = layer(x; A + U R Vh) with autograd to x and R that never forms the Linear's m x n
weight or weight gradient.

`semu_fast::lowrank_linear` and `semu_fast::lowrank_conv2d` are custom ops with fakes and autograd formulas, so
torch.compile keeps an adapted model in one graph. Their products run through three kernel ops whose backends
semu_fast.ops._library picks per device (composed PyTorch, or the Triton kernels of semu_fast.triton_kernels.lowrank):
  dual_matmul(a1, b1, a2, b2, bias) = a1 b1 + a2 b2 + bias   (Linear forward: [x, x Vh^T R^T] [A, U]^T;
                                                              backward: [dy, dy U R] [A, Vh])
  conv_delta_add(A, U, R, Vh)       = A + dW, dW[:, n] = U[n] R[n] Vh[n]  (the conv adapter's one weight)
  conv_delta_contract(dW, U, Vh)    = dR, dR[n] = U[n]^T dW[:, n] Vh[n]^T (R's gradient from the conv's)
Gradients for A, U, Vh and bias are exact too (composed; they are rarely wanted)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_same_device, check_tensor
from . import _registry
from ._library import Kernel
from .svd import conv_gradient_matrices, compute_dtype

Tensor = torch.Tensor

# ---- kernel ops: composed PyTorch backends and fakes -------------------------------------------------------------

def dual_matmul_torch(a1, b1, a2, b2, bias):
    """Two GEMMs into one output: the second accumulates in place (no extra m x n temporary)."""
    out = a1 @ b1 if bias is None else torch.addmm(bias, a1, b1)
    return out.addmm_(a2, b2)


def _dual_matmul_fake(a1, b1, a2, b2, bias):
    return a1.new_empty(a1.shape[0], b1.shape[1])


def conv_delta_weight(U: Tensor, R: Tensor, Vh: Tensor, kernel_size) -> Tensor:
    """dW (out, in, kh, kw) with dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel, in U's dtype."""
    delta = torch.bmm(U, torch.bmm(R, Vh))  # (in, out, kh*kw)
    return delta.transpose(0, 1).reshape(delta.shape[1], delta.shape[0], *kernel_size)


def conv_delta_add_torch(A, U, R, Vh):
    ct = compute_dtype(A.dtype)
    return (A.to(ct) + conv_delta_weight(U.to(ct), R.to(ct), Vh.to(ct), A.shape[2:])).to(A.dtype)


def conv_delta_contract_torch(dW, U, Vh):
    ct = compute_dtype(dW.dtype)
    return torch.bmm(torch.bmm(U.to(ct).transpose(1, 2), conv_gradient_matrices(dW).to(ct)), Vh.to(ct).transpose(1, 2))


def _triton(name: str):
    """The Triton kernel of a kernel op; float64 (which it does not serve) goes to the composed one."""
    composed = _TORCH[name]

    def impl(*args):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            return composed(*args)
        return getattr(_registry.triton_module("lowrank")[0], name)(*args)
    return impl


_TORCH = {"dual_matmul": dual_matmul_torch, "conv_delta_add": conv_delta_add_torch,
          "conv_delta_contract": conv_delta_contract_torch}
# Measured on an H200 (benchmarks/RESULTS.md): the Triton dual_matmul ran at 0.44-1.02x of cuBLAS's two addmm, so
# it serves only when forced; the conv delta kernels ran 1.2-2x faster than the composed bmm chains.
_DUAL_MATMUL_GATE = "measured slower than composed cuBLAS calls on an H200; SEMU_FAST_IMPL=triton uses it"
KERNELS = {
    "dual_matmul": Kernel("dual_matmul(Tensor a1, Tensor b1, Tensor a2, Tensor b2, Tensor? bias) -> Tensor",
                          fake=_dual_matmul_fake, impls={"torch": dual_matmul_torch, "triton": _triton("dual_matmul")},
                          triton_module="lowrank", triton_gate=_DUAL_MATMUL_GATE),
    "conv_delta_add": Kernel("conv_delta_add(Tensor A, Tensor U, Tensor R, Tensor Vh) -> Tensor",
                             fake=lambda A, U, R, Vh: torch.empty_like(A),
                             impls={"torch": conv_delta_add_torch, "triton": _triton("conv_delta_add")},
                             triton_module="lowrank"),
    "conv_delta_contract": Kernel("conv_delta_contract(Tensor dW, Tensor U, Tensor Vh) -> Tensor",
                                  fake=lambda dW, U, Vh: U.new_empty(U.shape[0], U.shape[2], U.shape[2],
                                                                     dtype=compute_dtype(dW.dtype)),
                                  impls={"torch": conv_delta_contract_torch,
                                         "triton": _triton("conv_delta_contract")},
                                  triton_module="lowrank"),
    "lowrank_linear": Kernel(None, note="composite: its products run through dual_matmul"),
    "lowrank_conv2d": Kernel(None, note="composite: its products run through conv_delta_add / conv_delta_contract"),
}


def _kernels():
    return torch.ops.semu_fast


# ---- Linear ------------------------------------------------------------------------------------------------------

@torch.library.custom_op("semu_fast::lowrank_linear", mutates_args=())
def _lowrank_linear(x: Tensor, weight: Tensor, U: Tensor, R: Tensor, Vh: Tensor,
                    bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x: (T, in), all operands in x's dtype. Returns y (T, out) and t = x Vh^T (T, k), kept for R's gradient."""
    t = x @ Vh.T
    y = _kernels().dual_matmul(x, weight.T, t @ R.T, U.T, bias)
    return y, t


@_lowrank_linear.register_fake
def _(x, weight, U, R, Vh, bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], R.shape[0])


def _lowrank_linear_setup(ctx, inputs, output):
    x, weight, U, R, Vh, bias = inputs
    ctx.save_for_backward(x, weight, U, R, Vh, output[1])
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _refuse_double_backward(op: str) -> None:
    """Both backwards read tensors saved without history (t = x Vh^T; the adapted conv weight): differentiating
    them again would silently leave those paths out, so a backward that would record a graph (create_graph=True)
    is refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no double backward: differentiate it once (create_graph=False), or merge the "
                           f"adapters (semu_model.merge_adapters()) for higher-order gradients")


def _lowrank_linear_backward(ctx, dy, _):
    _refuse_double_backward("lowrank_linear")
    if dy is None:  # grads are not materialised (t has none): y unused
        return (None,) * 6
    x, weight, U, R, Vh, t = ctx.saved_tensors
    need_x, need_w, need_u, need_r, need_vh, need_b = ctx.needs_input_grad[:6]
    g = dy @ U  # (T, k)
    gR = g @ R
    dx = _kernels().dual_matmul(dy, weight, gR, Vh, None) if need_x else None
    dR = g.T @ t if need_r else None
    dW = dy.T @ x if need_w else None
    dU = dy.T @ (t @ R.T) if need_u else None
    dVh = gR.T @ x if need_vh else None
    db = dy.sum(0) if need_b and ctx.has_bias else None
    return dx, dW, dU, dR, dVh, db


_lowrank_linear.register_autograd(_lowrank_linear_backward, setup_context=_lowrank_linear_setup)


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


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def _autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype torch.autocast would run a Linear/conv of x in (float32 x goes to autocast's dtype, others stay),
    None when autocast is off on x's device."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if x.dtype == torch.float32 else x.dtype


def lowrank_linear(x, weight, U, R, Vh, bias=None):
    """y = x A^T + ((x Vh^T) R^T) U^T + b, never materialising A + U R Vh (nor, in backward, an m x n gradient).

    x: (..., in), any strides; weight A: (out, in); U: (out, k); R: (k, k); Vh: (k, in); bias: (out,) or None.
    Factors are cast to x's dtype; y has x's dtype. Autograd: x, R, and A, U, Vh, bias when they require grad.
    Under torch.autocast it computes in autocast's dtype, as F.linear does there."""
    autocast = _autocast_dtype(x)
    if autocast is not None:  # the op's own GEMMs must not be re-cast one by one (their in-place sum would mix dtypes)
        with torch.autocast(x.device.type, enabled=False):
            return lowrank_linear(x.to(autocast), weight, U, R, Vh, bias)
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have shape (..., in), got a 0-d tensor")
    check_tensor("weight", weight, dims=(2,))
    _check_factors(weight, U, R, Vh, bias, batched=False)
    if Vh.shape[1] != weight.shape[1] or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., in), weight (out, in) and Vh (k, in) must agree on in; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, Vh {tuple(Vh.shape)}")
    check_same_device(x=x, weight=weight, U=U, R=R, Vh=Vh, bias=bias)
    rows = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)  # not reshape(-1, in): in may be 0
    y, _ = _lowrank_linear(rows, *_cast(x.dtype, weight, U, R, Vh, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- Conv2d ------------------------------------------------------------------------------------------------------

@torch.library.custom_op("semu_fast::lowrank_conv2d", mutates_args=())
def _lowrank_conv2d(x: Tensor, weight: Tensor, U: Tensor, R: Tensor, Vh: Tensor, bias: Optional[Tensor],
                    stride: list[int], padding: list[int], dilation: list[int]) -> tuple[Tensor, Tensor]:
    """conv2d(x, A + dW): x (N, in, H, W) and weight in one dtype, weight contiguous; U, R, Vh any float dtype.
    Returns y and the adapted weight A + dW, kept for backward (the size of A; recomputing it costs as much as
    a pass over the weight, ~4% of a step at ResNet-18's 512-channel convs)."""
    adapted = _kernels().conv_delta_add(weight, U, R, Vh)
    return F.conv2d(x, adapted, bias, stride, padding, dilation), adapted


@_lowrank_conv2d.register_fake
def _(x, weight, U, R, Vh, bias, stride, padding, dilation):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty(x.shape[0], weight.shape[0], *size), torch.empty_like(weight)


def _lowrank_conv2d_setup(ctx, inputs, output):
    x, weight, U, R, Vh, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, U, R, Vh, output[1])
    ctx.conv = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _lowrank_conv2d_backward(ctx, dy, _):
    _refuse_double_backward("lowrank_conv2d")
    if dy is None:
        return (None,) * 9
    x, U, R, Vh, adapted = ctx.saved_tensors
    need_x, need_w, need_u, need_r, need_vh, need_b = ctx.needs_input_grad[:6]
    stride, padding, dilation = ctx.conv
    need_dW = need_w or need_u or need_r or need_vh
    dx, dW, db = torch.ops.aten.convolution_backward(
        dy, x, adapted, [adapted.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0], 1,
        [need_x, need_dW, need_b and ctx.has_bias])
    dR = _kernels().conv_delta_contract(dW, U, Vh).to(R.dtype) if need_r else None
    dU = dVh = None
    if need_u or need_vh:  # in the factors' common dtype (they may differ, as in the forward's conv_delta_add)
        dtype = torch.promote_types(torch.promote_types(U.dtype, R.dtype), Vh.dtype)
        G, Uc, Rc, Vc = (t.to(dtype) for t in (conv_gradient_matrices(dW), U, R, Vh))  # G: (in, out, kh*kw)
        dU = (G @ (Rc @ Vc).transpose(1, 2)).to(U.dtype) if need_u else None
        dVh = ((Uc @ Rc).transpose(1, 2) @ G).to(Vh.dtype) if need_vh else None
    return dx, dW if need_w else None, dU, dR, dVh, db, None, None, None


_lowrank_conv2d.register_autograd(_lowrank_conv2d_backward, setup_context=_lowrank_conv2d_setup)


def _pair(name: str, value) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _explicit_padding(x, padding, kernel, dilation):
    """Conv padding as ints, padding x itself where "same" needs more on one side (F.conv2d does the same)."""
    if padding == "valid":
        return x, [0, 0]
    if padding != "same":
        return x, _pair("padding", padding)
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if all(t % 2 == 0 for t in total):
        return x, [t // 2 for t in total]
    left = [t // 2 for t in total]
    x = F.pad(x, [left[1], total[1] - left[1], left[0], total[0] - left[0]])
    return x, [0, 0]


def lowrank_conv2d(x, weight, U, R, Vh, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(x, A + dW) with dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel: one convolution.

    x: (N, in, H, W) or (in, H, W); weight A: (out, in, kh, kw); U: (in, out, k); R: (in, k, k);
    Vh: (in, k, kh*kw); bias: (out,) or None; stride/dilation ints or pairs, padding ints, pairs, "same" or
    "valid". groups must be 1 (SEMU's per-input-channel split needs all of W). Weight and bias are cast to x's
    dtype; dW is formed in float32 (float64 for float64 x). R's gradient comes from the conv's weight gradient
    contracted with U and Vh. Under torch.autocast it computes in autocast's dtype, as F.conv2d does there."""
    autocast = _autocast_dtype(x)
    if autocast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return lowrank_conv2d(x.to(autocast), weight, U, R, Vh, bias, stride, padding, dilation, groups)
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
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    if padding == "same" and stride != [1, 1]:  # as F.conv2d: "same" is defined for unit strides only
        raise ValueError(f"padding='same' needs stride 1, got stride {tuple(stride)}")
    unbatched = x.dim() == 3
    x, padding = _explicit_padding(x.unsqueeze(0) if unbatched else x, padding, (kh, kw), dilation)
    weight, bias = _cast(x.dtype, weight, bias)
    y, _ = _lowrank_conv2d(x, weight.contiguous(), U, R, Vh, bias, stride, padding, dilation)
    return y.squeeze(0) if unbatched else y
