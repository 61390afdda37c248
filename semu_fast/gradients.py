"""The forget-set gradient pass: sum of the loss gradients over the forget loader, per selected weight, streamed
into float32 accumulators as backward produces them (no per-batch clones), with the model left as it was found."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, ops
from .layers import is_conv1d, parameter_owners
from .losses import cross_entropy_loss

LossFn = Callable[[nn.Module, object], torch.Tensor]
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def set_norm_mode(model: nn.Module, norm_mode: str) -> None:
    """model.train() as the official classification code does for norm_mode == "train"; model.eval() for
    "eval_all" (the official DDPM/SD gradient passes and every official training phase); for "eval" (the default)
    norm layers go to eval mode and every other module keeps the mode the user left it in (so an eval-mode model
    gives the same gradients and ranks on every run: no dropout, stochastic depth or attention dropout turns on),
    except two kinds of module marked training (that module alone, not its children), which need it: a layer with
    transformers' gradient checkpointing on (checkpointing runs only in training; dropout that layer applies
    itself runs too) and RNN layers (cuDNN's RNN backward runs only in training; their inter-layer dropout too)."""
    if norm_mode == "eval_all":
        model.eval()
    elif norm_mode == "train":
        model.train()
    else:
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                module.eval()
            elif isinstance(module, nn.RNNBase) or getattr(module, "gradient_checkpointing", False) is True:
                module.training = True


class _ModelState:
    """Saves and restores what a pass may touch: training flags, requires_grad and existing .grad tensors."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = {m: m.training for m in model.modules()}
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, mode in self.modes.items():
            module.training = mode
        for param, flag, grad in self.params:
            param.requires_grad_(flag)
            param.grad = grad


class GradientSums(dict):
    """{name: the layer's weight gradient summed over the forget pass, float32}, and rows: {name: the input rows
    (tokens) a Linear or Conv1D layer took in its forwards during the pass}, for the layers whose weight no other
    module uses. A 2-D layer's gradient is a sum of one outer product per row, so its rank is at most that count
    (the SVD phase sizes its sketch by it)."""

    def __init__(self, sums: dict, rows: dict):
        super().__init__(sums)
        self.rows = rows


class _StreamedLinear(torch.autograd.Function):
    """F.linear whose backward adds the weight gradient dy^T x straight into a float32 accumulator (one GEMM with
    float32 output, sf.ops.accumulate_matmul_) instead of forming it in the weight's dtype and adding that: half the
    memory traffic, and no rounding of each batch's gradient to bf16. It gives autograd no weight gradient (a
    post-accumulate-grad hook adds those of the weight's other uses)."""

    @staticmethod
    def forward(ctx, x, weight, bias, acc):
        ctx.save_for_backward(x, weight)
        ctx.acc = acc
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        a, b = dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1])
        if a.dtype != b.dtype:  # autocast: dy in the autocast dtype, x as it came
            a, b = a.float(), b.float()
        ops.accumulate_matmul_(ctx.acc, a, b)
        return dx, None, None, None


def _refuse_zero_grad(*args, **kwargs):
    raise RuntimeError("zero_grad() was called during the gradient pass: it would erase the forget gradients summed "
                       "so far; loss_fn must only compute the loss (prepare handles the gradients)")


def _streamable(module: nn.Module, shared: set) -> bool:
    """A plain nn.Linear (its class's forward, not one set on the instance by a hook library or the user) with a
    half-precision, unsharded weight that no other module uses (a shared weight's gradient sums every use: the
    hook path gives that in every dtype, the streamed one would see this layer's use alone)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in module.__dict__ and id(module.weight) not in shared
            and module.weight.dtype in (torch.bfloat16, torch.float16) and not distributed.is_sharded(module.weight))


class _Pass:
    """The hooks of one gradient pass and their undoing. Three ways a layer's gradient reaches its accumulator:
    "direct" (a contiguous float32 weight sums in its own .grad, as a plain backward does: no copy, no extra pass),
    "streamed" (a half-precision Linear: _StreamedLinear) and "hooked" (any other weight: a post-accumulate-grad hook
    adds autograd's gradient to a float32 accumulator and frees it). With grad_clip every layer is "clipped": each
    batch's gradients stay in .grad until the batch's total norm is known, then join the sums scaled by
    min(1, grad_clip / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ scales them."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], grad_clip: Optional[float] = None):
        self.model, self.layers, self.grad_clip = model, layers, grad_clip
        self.weights = {name: layer.weight for name, layer in layers.items()}
        self.sharded = {n for n, w in self.weights.items() if distributed.is_sharded(w)}  # FSDP2: reduced per batch
        if grad_clip is not None and self.sharded:
            raise ValueError("grad_clip needs each batch's whole gradient: it does not run on FSDP-sharded weights")
        self.clipped = set(self.weights) if grad_clip is not None else set()
        self.direct = {n for n, w in self.weights.items() if n not in self.sharded and n not in self.clipped
                       and w.dtype == torch.float32 and w.is_contiguous()}
        shared = {key for key, owners in parameter_owners(model).items() if len(owners) > 1}
        self.streamed = {n for n, layer in layers.items() if n not in self.direct and n not in self.clipped
                         and _streamable(layer, shared)}
        self.accumulators = {
            name: None if name in self.direct else
            torch.zeros_like(w, dtype=torch.float32) if name in self.sharded else
            torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in self.weights.items()}
        self.state = _ModelState(model)
        self.hooks, self.patched = [], []
        # zero_grad() from loss_fn would erase the float32 layers' sums, which live in their own .grad
        self.guarded = [m for m in model.modules() if "zero_grad" not in m.__dict__] if self.direct else []
        self.rows = {n: 0.0 for n, layer in layers.items() if n not in self.sharded and id(layer.weight) not in shared
                     and (isinstance(layer, nn.Linear) or is_conv1d(layer))}

    def install(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)
            param.grad = None
        for module in self.guarded:
            module.zero_grad = _refuse_zero_grad
        for name, layer in self.layers.items():
            if name in self.rows:
                self.hooks.append(layer.register_forward_pre_hook(self._row_counter(name)))
            acc = self.accumulators[name]
            if name in self.streamed:
                self.patched.append(layer)
                layer.forward = (lambda input, layer=layer, acc=acc:  # nn.Linear's argument name
                                 _StreamedLinear.apply(input, layer.weight, layer.bias, acc))
            layer.weight.requires_grad_(True)
        # A weight that two selected layers share: one hook feeds both accumulators. A streamed layer's weight gets
        # autograd gradients only from uses outside its module (a tied decoder's F.linear): its hook adds those.
        hooked: dict[int, list] = {}
        for name, weight in self.weights.items():
            if name not in self.direct and name not in self.clipped:
                hooked.setdefault(id(weight), [weight]).append(self.accumulators[name])
        for weight, *accs in hooked.values():
            self.hooks.append(weight.register_post_accumulate_grad_hook(self._hook(accs)))

    def _row_counter(self, name: str):
        def count(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1]:
                self.rows[name] += x.numel() // x.shape[-1]
            else:  # an input we cannot read rows from: no bound for this layer (the same keys on every rank)
                self.rows[name] = float("inf")
        return count

    @staticmethod
    def _hook(accs):
        def add(acc, grad):  # a sharded (FSDP2) accumulator adds shard by shard; the others: fused fp32 accumulate
            acc.add_(grad) if distributed.is_sharded(acc) else ops.accumulate_([acc], [grad])

        def hook(param):
            if param.grad is None:  # a streamed layer's own use: its gradient went to the accumulator already
                return
            for acc in accs:
                add(acc, param.grad)
            param.grad = None
        return hook

    def after_batch(self) -> None:
        if self.clipped:
            unique = {id(w): w for w in self.weights.values()}.values()  # a shared weight counts once in the norm
            grads = [w.grad for w in unique if w.grad is not None]
            first = grads[0].device if grads else torch.device("cpu")  # a model may span several devices
            norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).to(first)
                     for g in grads]  # float32 at least, float64 for float64 weights
            norm = torch.linalg.vector_norm(torch.stack(norms)) if grads else torch.zeros(())
            scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(scale.to(grad.device, grad.dtype))
            for name, weight in self.weights.items():
                if weight.grad is not None:
                    ops.accumulate_([self.accumulators[name]], [weight.grad])
            for weight in unique:
                weight.grad = None
        for name in self.direct:
            grad = self.weights[name].grad
            if self.accumulators[name] is None:
                self.accumulators[name] = grad
            elif grad is not self.accumulators[name]:
                raise RuntimeError(f"the gradient of layer {name!r} was replaced during the pass (does loss_fn "
                                   f"call zero_grad?); loss_fn must only compute the loss")

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for layer in self.patched:
            del layer.forward  # only layers without an instance-level forward are streamed
        for module in self.guarded:
            module.__dict__.pop("zero_grad", None)
        self.state.restore()

    def sums(self) -> dict[str, torch.Tensor]:
        for name in self.direct:
            acc = self.accumulators[name]
            self.accumulators[name] = torch.zeros_like(self.weights[name]) if acc is None else acc.contiguous()
        for name in [n for n in self.weights if n in self.sharded]:  # in model order on every rank
            # FSDP2 averaged each batch over its mesh: gather the whole sum.
            mesh_size = self.accumulators[name].device_mesh.size()
            self.accumulators[name] = distributed.full_tensor(self.accumulators[name]).mul_(mesh_size)
        return self.accumulators


def _check_losses(nonfinite: int, batches: int) -> None:
    """A NaN loss whose gradient is finite (a mean over no targets: every label ignored, say -100 everywhere) adds
    nothing to the sums: on every batch, no layer would get an adapter and nothing would say why."""
    if nonfinite == batches:
        raise ValueError(f"the forget loss was NaN or Inf on all {batches} batches, so the gradients say nothing "
                         f"about the forget data (are all targets ignored, e.g. every label -100?)")
    if nonfinite:
        warnings.warn(f"the forget loss was NaN or Inf on {nonfinite} of {batches} batches (targets all ignored?); "
                      f"their gradients were finite and joined the sums", stacklevel=3)


def accumulate_gradients(model: nn.Module, loader: Iterable, layers: dict[str, nn.Module],
                         loss_fn: Optional[LossFn] = None, norm_mode: str = "eval",
                         group: Optional[distributed.Group] = None,
                         grad_clip: Optional[float] = None) -> GradientSums:
    """{name: sum over batches of d loss / d layer.weight} as float32 tensors, for the layers (modules with a
    .weight) named in `layers`, with the input rows each Linear saw (GradientSums.rows).

    Gradients stream into float32 accumulators as backward produces them (see _Pass): the pass holds the
    accumulators plus at most one layer's fresh gradient. The model's modes, forwards, requires_grad flags and
    existing gradients are restored afterwards, also on error. grad_clip: clip each batch's gradient (total norm over
    the layers) to this before it joins the sums, as the official DDPM/SD gradient pass does. With a distributed
    group, each rank passes its shard and the sums are all-reduced (bucketed) so every rank returns the whole forget
    set's gradients (a rank may hold no batch, but not all of them; a rank's error is raised on every rank, as
    distributed.RankFailed on the others). Raises ValueError for an empty loader, TypeError for a loss that is not a
    scalar tensor, FloatingPointError (naming the layer) for NaN or Inf in a summed gradient."""
    loss_fn = loss_fn or cross_entropy_loss
    grad_pass = _Pass(model, layers, grad_clip)
    if grad_pass.sharded and group is not None:  # a rank with fewer batches would leave the others waiting
        distributed.check_same_lengths({"forget_loader": loader}, group, "an FSDP2-sharded model reduces every "
                                        "batch's gradient across the ranks")
    batches, failure = 0, None
    nonfinite = None  # batches whose loss was NaN or Inf, counted on the device (no synchronisation per batch)
    try:
        grad_pass.install()
        set_norm_mode(model, norm_mode)
        for batch in loader:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on any selected layer's weight (no gradient flows)")
            loss.reshape(()).backward()
            bad = ~torch.isfinite(loss.detach().reshape(()))
            nonfinite = bad.double() if nonfinite is None else nonfinite + bad
            batches += 1
            grad_pass.after_batch()
    except Exception as err:
        if group is None or grad_pass.sharded:  # FSDP2's own per-batch collectives cannot carry it
            raise
        failure = err  # raised on every rank by the sums' all-reduce
    finally:
        grad_pass.remove()
    accumulators = grad_pass.sums()
    rows = grad_pass.rows
    nonfinite = float(nonfinite) if nonfinite is not None else 0.0
    if group is not None:  # a rank may hold no batch (without FSDP); only the whole forget set must
        count = torch.tensor([float(batches), nonfinite] + list(rows.values()),
                             device=next(iter(accumulators.values())).device, dtype=torch.float64)
        distributed.all_reduce_outcome_([acc for name, acc in accumulators.items() if name not in grad_pass.sharded]
                                        + [count], group, failure, "in the gradient pass", count.device)
        batches, nonfinite = int(count[0].item()), float(count[1].item())
        rows = dict(zip(rows, count[2:].tolist()))
    if batches == 0:
        raise ValueError("forget_loader yielded no batches; SEMU needs forget data to compute gradients")
    for name, acc in accumulators.items():
        # A norm is a fast test (NaN and Inf reach it); only when it overflows is each element checked.
        if not torch.isfinite(torch.linalg.vector_norm(acc)) and not torch.isfinite(acc).all():
            raise FloatingPointError(f"the summed forget gradient of layer {name!r} holds NaN or Inf")
    _check_losses(int(nonfinite), batches)
    return GradientSums(accumulators, {n: int(r) for n, r in rows.items() if math.isfinite(r)})
