"""sf.ops.gram_svd (the conv path of truncated_svd) against torch.linalg.svd on the same batch, in one run, for the
conv gradient shapes of the CIFAR ResNet-18: (out, in, kh, kw) split per input channel into `in` matrices of
out x (kh*kw)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, backend, device_name, parser as make_parser, timeit  # noqa: E402

RESNET18_CONVS = [(64, 3, 3), (64, 64, 3), (128, 64, 3), (128, 128, 3), (128, 64, 1), (256, 128, 3),
                  (256, 256, 3), (256, 128, 1), (512, 256, 3), (512, 512, 3), (512, 256, 1)]


def main(argv=None):
    parser = make_parser(__doc__, repeats=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    total_ours, total_ref, worst = 0.0, 0.0, 0.0
    table = Table(f"gram_svd ({backend('gram_svd', device)}) vs torch.linalg.svd, ResNet-18 conv gradients, "
                  f"{device_name(device)}", args.json)
    for out, cin, ks in RESNET18_CONVS[:2] if args.quick else RESNET18_CONVS:
        G = torch.randn(out, cin, ks, ks, generator=gen, device=device).permute(1, 0, 2, 3).flatten(2)
        t_ref = timeit(lambda: torch.linalg.svd(G, full_matrices=False), device, args.repeats)
        t_ours = timeit(lambda: sf.ops.gram_svd(G), device, args.repeats)
        _, S, _ = sf.ops.gram_svd(G)
        S_ref = torch.linalg.svdvals(G.double())
        total_ours, total_ref = total_ours + t_ours, total_ref + t_ref
        err = float(((S.double() - S_ref).abs() / S_ref[:, :1]).max())
        worst = max(worst, err)
        table.add({"batch x m x n": "x".join(map(str, G.shape)), "gram_svd ms": t_ours * 1e3,
                   "linalg.svd ms": t_ref * 1e3, "speedup": t_ref / t_ours, "S max rel err": err})
    table.add({"batch x m x n": "all layers", "gram_svd ms": total_ours * 1e3, "linalg.svd ms": total_ref * 1e3,
               "speedup": total_ref / total_ours, "S max rel err": worst})
    table.close()


if __name__ == "__main__":
    main()
