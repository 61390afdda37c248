"""One small call of every CUDA kernel of semu_fast (and, with --triton, every Triton kernel), for
compute-sanitizer: `compute-sanitizer --tool memcheck python3 benchmarks/sanitize_kernels.py --triton`.
Shapes cover the awkward cases (tails shorter than a block, empty tensors, several dtypes in one call, strided
inputs, gram_svd from n = 1 to 64) but stay tiny: every access is instrumented."""
from __future__ import annotations

import argparse

import torch

import semu_fast as sf


def cuda_kernels(device) -> None:
    shapes = [(37, 5), (0, 3), (1000,), (3, 4, 3, 3)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
    accs = [torch.zeros(s, device=device) for s in shapes]
    grads = [torch.randn(s[::-1], device=device).to(d).t() if len(s) == 2 else torch.randn(s, device=device).to(d)
             for s, d in zip(shapes, dtypes)]
    sf.ops.accumulate_(accs, grads)
    weights = [torch.randn(s, device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    sf.ops.project_perpendicular_(accs, weights, "orthogonal")
    for n in (1, 9, 25, 49, 64):
        sf.ops.gram_svd(torch.randn(3, 20, n, device=device))


def triton_kernels(device) -> None:
    from semu_fast.triton_kernels import accumulate, lowrank

    acc = torch.zeros(1000, device=device)
    accumulate.accumulate_([acc], [torch.randn(1000, device=device, dtype=torch.bfloat16)])
    a1, b1 = torch.randn(33, 70, device=device), torch.randn(70, 45, device=device)
    a2, b2 = torch.randn(33, 5, device=device), torch.randn(45, 5, device=device).t()
    bias = torch.randn(90, device=device)[::2]
    lowrank.dual_matmul(*(t.to(torch.bfloat16) for t in (a1, b1, a2, b2, bias)))
    A, U = torch.randn(17, 6, 3, 3, device=device), torch.randn(6, 17, 4, device=device)
    R, Vh = torch.randn(6, 4, 4, device=device), torch.randn(6, 4, 9, device=device)
    lowrank.conv_delta_add(A, U, R, Vh)
    lowrank.conv_delta_contract(A, U, Vh)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--triton", action="store_true", help="also the Triton kernels")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda_kernels(device)
    if args.triton:
        triton_kernels(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("all kernels ran")


if __name__ == "__main__":
    main()
