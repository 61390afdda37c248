"""The SEMU Linear adapter, forward + backward while training R (x requires grad), against its anchors in one run:
the frozen nn.Linear (the floor), the official adapter that materialises A + U R Vh on every forward, and a
peft-style unfused LoRA chain. Ours is sf.ops.lowrank_linear (composed PyTorch today; issue 4 owns the kernels)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import device_name, emit, parser as make_parser, timeit  # noqa: E402


def main(argv=None):
    parser = make_parser(__doc__, repeats=3)
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--shapes", default="4096x4096", help="out x in, comma-separated")
    parser.add_argument("--tokens", default="2048")
    parser.add_argument("--ranks", default="8,64,256")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = []
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.split("x"))
        W = torch.randn(out, inp, device=device, dtype=dtype) / inp ** 0.5
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, inp, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(tokens, out, device=device, dtype=dtype)
            for k in map(int, args.ranks.split(",")):
                U = torch.linalg.qr(torch.randn(out, k, device=device)).Q.to(dtype)
                Vh = torch.linalg.qr(torch.randn(inp, k, device=device)).Q.T.contiguous().to(dtype)
                R = torch.zeros(k, k, device=device, dtype=dtype, requires_grad=True)

                def step(fn):
                    x.grad = R.grad = None
                    fn().backward(dy)

                impls = {
                    "frozen nn.Linear": lambda: F.linear(x, W),
                    "official (materialise)": lambda: F.linear(x, W + U @ R @ Vh),
                    "peft-style chain": lambda: F.linear(x, W) + (x @ Vh.T) @ R.T @ U.T,
                    "sf.ops.lowrank_linear": lambda: sf.ops.lowrank_linear(x, W, U, R, Vh),
                }
                t = {name: timeit(lambda fn=fn: step(fn), device, args.repeats) for name, fn in impls.items()}
                ours = t["sf.ops.lowrank_linear"]
                rows.append({"shape": shape, "tokens": tokens, "k": k, "ours ms": ours * 1e3,
                             "vs frozen (goal <= 1.10 CPU, 1.05 GPU)": ours / t["frozen nn.Linear"],
                             "official / ours (goal >= 1.3 CPU)": t["official (materialise)"] / ours,
                             "peft chain / ours": t["peft-style chain"] / ours})
                print(rows[-1], flush=True)
    emit(rows, f"Linear adapter fwd+bwd (train R, x requires grad), {dtype}, {device_name(device)}", args.json)


if __name__ == "__main__":
    main()
