"""Triton kernel of semu_fast::accumulate_: fp32 accumulator += any float gradient, one launch per tensor.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _accumulate_kernel(acc_ptr, grad_ptr, numel, BLOCK: tl.constexpr):
    # 64-bit offsets: a layer's weight can hold more than 2^31 elements (an LLM's embedding or LM head).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.load(acc_ptr + offsets, mask=mask)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(acc_ptr + offsets, acc + grad, mask=mask)


def accumulate_(accumulators: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """accumulators[i] += grads[i]; accumulators contiguous float32, arguments already checked by the caller."""
    for acc, grad in zip(accumulators, grads):
        if acc.numel() == 0:
            continue
        grad = grad.contiguous()
        _accumulate_kernel[(triton.cdiv(acc.numel(), BLOCK),)](acc, grad, acc.numel(), BLOCK=BLOCK)
