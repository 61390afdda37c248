"""The forget-set gradient pass: sum of the loss gradients over the forget loader, per selected weight, streamed
into float32 accumulators as backward produces them (no per-batch clones), with the model left as it was found."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn

from . import distributed, ops
from .losses import cross_entropy_loss

LossFn = Callable[[nn.Module, object], torch.Tensor]
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def set_norm_mode(model: nn.Module, norm_mode: str) -> None:
    """model.train(), but with norm layers in eval mode unless norm_mode == "train" (the official behaviour)."""
    model.train()
    if norm_mode == "eval":
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                module.eval()


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


def accumulate_gradients(model: nn.Module, loader: Iterable, weights: dict[str, torch.Tensor],
                         loss_fn: Optional[LossFn] = None, norm_mode: str = "eval",
                         group: Optional[distributed.Group] = None) -> dict[str, torch.Tensor]:
    """{name: sum over batches of d loss / d weight} as float32 tensors.

    A contiguous float32 weight accumulates in its own .grad, exactly as a plain backward does (the first batch's
    gradient is kept, later ones are added in place): no copy, no extra pass. Any other weight's gradient is added
    to a float32 accumulator by a post-accumulate-grad hook and freed at once. Either way the pass holds the
    accumulators plus one layer's fresh gradient. The model's modes, requires_grad flags and existing gradients
    are restored afterwards, also on error. With a distributed group, each rank passes its shard and the sums are
    all-reduced (bucketed) so every rank returns the whole forget set's gradients. Raises ValueError for an empty loader, TypeError for a loss that is
    not a scalar tensor, FloatingPointError (naming the layer) for NaN or Inf in a summed gradient."""
    loss_fn = loss_fn or cross_entropy_loss
    sharded = {name for name, w in weights.items() if distributed.is_sharded(w)}  # FSDP2: reduced per batch
    direct = {name for name, w in weights.items()
              if name not in sharded and w.dtype == torch.float32 and w.is_contiguous()}
    accumulators = {name: None if name in direct else
                    torch.zeros_like(w, dtype=torch.float32) if name in sharded else
                    torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    state = _ModelState(model)
    hooks = []

    def hook_for(acc):
        # A sharded (FSDP2) accumulator adds shard by shard; the others take the fused fp32 accumulate.
        add = acc.add_ if distributed.is_sharded(acc) else lambda grad: ops.accumulate_([acc], [grad])

        def hook(param):
            add(param.grad)
            param.grad = None
        return hook

    try:
        for param in model.parameters():
            param.requires_grad_(False)
            param.grad = None
        for name, weight in weights.items():
            weight.requires_grad_(True)
            if name not in direct:
                hooks.append(weight.register_post_accumulate_grad_hook(hook_for(accumulators[name])))
        set_norm_mode(model, norm_mode)
        batches = 0
        for batch in loader:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on any selected layer's weight (no gradient flows)")
            loss.reshape(()).backward()
            batches += 1
            for name in direct:
                grad = weights[name].grad
                if accumulators[name] is None:
                    accumulators[name] = grad
                elif grad is not accumulators[name]:
                    raise RuntimeError(f"the gradient of layer {name!r} was replaced during the pass (does loss_fn "
                                       f"call zero_grad?); loss_fn must only compute the loss")
    finally:
        for hook in hooks:
            hook.remove()
        state.restore()
    for name in direct:
        acc = accumulators[name]
        w = weights[name]
        accumulators[name] = torch.zeros_like(w) if acc is None else acc.contiguous()
    for name in [n for n in weights if n in sharded]:  # in model order on every rank (a set's order differs)
        # FSDP2 averaged each batch over its mesh: gather the whole sum.
        mesh_size = accumulators[name].device_mesh.size()
        accumulators[name] = distributed.full_tensor(accumulators[name]).mul_(mesh_size)
    if group is not None:  # a rank may hold no batch (without FSDP); only the whole forget set must
        count = torch.tensor([float(batches)], device=next(iter(weights.values())).device)
        distributed.all_reduce_sum_([acc for name, acc in accumulators.items() if name not in sharded] + [count],
                                    group)
        batches = int(count.item())
    if batches == 0:
        raise ValueError("forget_loader yielded no batches; SEMU needs forget data to compute gradients")
    for name, acc in accumulators.items():
        # A norm is a fast test (NaN and Inf reach it); only when it overflows is each element checked.
        if not torch.isfinite(torch.linalg.vector_norm(acc)) and not torch.isfinite(acc).all():
            raise FloatingPointError(f"the summed forget gradient of layer {name!r} holds NaN or Inf")
    return accumulators
