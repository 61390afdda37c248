"""sf.ops.accumulate_ against its anchors, in one run: the plain PyTorch loop (acc.add_(g.float()) per tensor,
the reference) and the official clone-and-sum pattern. Shapes: the weights of one Llama-7B decoder layer on CPU
(scaled by --scale), 8 layers on GPU. Reports GB/s (bytes read + written) and the ratio to each anchor."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import device_name, emit, timeit  # noqa: E402
from semu_fast import reference  # noqa: E402

# (out, in) of one Llama-7B decoder layer: q, k, v, o, gate, up, down.
LLAMA_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--scale", type=float, default=None, help="shrink each dim (default 0.5 on CPU, 1 on GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    layers = args.layers or (8 if device.type == "cuda" else 1)
    scale = args.scale or (1.0 if device.type == "cuda" else 0.5)
    dtype = getattr(torch, args.dtype)
    shapes = [(int(o * scale), int(i * scale)) for o, i in LLAMA_LAYER] * layers
    grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    accs = [torch.zeros(s, device=device) for s in shapes]
    numel = sum(g.numel() for g in grads)
    moved = numel * (grads[0].element_size() + 2 * 4)  # read grad, read + write fp32 accumulator

    def fused():
        sf.ops.accumulate_(accs, grads)

    def loop():
        reference.accumulate_(accs, grads)

    def clone_and_sum():  # the official code: clone each batch's gradients, then add them up
        clones = [g.clone() for g in grads]
        for a, c in zip(accs, clones):
            a += c

    rows = []
    t = {name: timeit(fn, device) for name, fn in (("accumulate_", fused), ("torch loop", loop),
                                                    ("clone-and-sum", clone_and_sum))}
    backend = sf.backends()["accumulate_"]["CUDA" if device.type == "cuda" else "CPU"]["chosen"]
    for name, seconds in t.items():
        rows.append({"impl": name if name != "accumulate_" else f"accumulate_ ({backend})", "ms": seconds * 1e3,
                     "GB/s": moved / seconds / 1e9, "time vs accumulate_": seconds / t["accumulate_"]})
    emit(rows, f"accumulate_: {len(shapes)} tensors, {numel / 1e6:.1f}M elements, {args.dtype} grads, "
               f"{device_name(device)}", args.json)


if __name__ == "__main__":
    main()
