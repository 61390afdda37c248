"""sf.ops.gram_svd (the conv path of truncated_svd) against its anchors on the same batch, interleaved in one run,
for the conv gradient shapes of the CIFAR ResNet-18: (out, in, kh, kw) split per input channel into `in` matrices
of out x (kh*kw). Anchors: torch.linalg.svd, and batched torch.linalg.eigh of the float64 Gram matrices (the
singular values and V only; U would cost one more batched product). The singular values are checked against
float64 svdvals first."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, alternate, backend, check_close, device_name, parser as make_parser  # noqa: E402

RESNET18_CONVS = [(64, 3, 3), (64, 64, 3), (128, 64, 3), (128, 128, 3), (128, 64, 1), (256, 128, 3),
                  (256, 256, 3), (256, 128, 1), (512, 256, 3), (512, 512, 3), (512, 256, 1)]


def gram_eigh(G: torch.Tensor):
    """S and V of each matrix from the eigendecomposition of its float64 Gram G^T G (ascending: flipped)."""
    evals, V = torch.linalg.eigh(G.double().transpose(-1, -2) @ G.double())
    return evals.flip(-1).clamp_min(0).sqrt(), V.flip(-1)


def main(argv=None):
    parser = make_parser(__doc__, repeats=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    totals = {"gram_svd": 0.0, "linalg.svd": 0.0, "eigh of the Gram": 0.0}
    worst = 0.0
    table = Table(f"gram_svd ({backend('gram_svd', device)}) vs torch.linalg.svd and batched eigh of the float64 "
                  f"Gram, ResNet-18 conv gradients, {device_name(device)}", args.json)
    for out, cin, ks in RESNET18_CONVS[:2] if args.quick else RESNET18_CONVS:
        G = torch.randn(out, cin, ks, ks, generator=gen, device=device).permute(1, 0, 2, 3).flatten(2)
        S_ref = torch.linalg.svdvals(G.double())
        _, S, _ = sf.ops.gram_svd(G)
        check_close("gram_svd", S, S_ref, atol=1e-5 * float(S_ref.max()))
        check_close("eigh of the Gram", gram_eigh(G)[0], S_ref, atol=1e-5 * float(S_ref.max()))
        err = float(((S.double() - S_ref).abs() / S_ref[:, :1]).max())
        worst = max(worst, err)
        times = alternate({"gram_svd": lambda: sf.ops.gram_svd(G),
                           "linalg.svd": lambda: torch.linalg.svd(G, full_matrices=False),
                           "eigh of the Gram": lambda: gram_eigh(G)}, device, args.repeats)
        for name, t in times.items():
            totals[name] += t
        table.add({"batch x m x n": "x".join(map(str, G.shape)), **{f"{n} ms": t * 1e3 for n, t in times.items()},
                   "svd / ours": times["linalg.svd"] / times["gram_svd"],
                   "eigh / ours": times["eigh of the Gram"] / times["gram_svd"], "S max rel err": err})
    table.add({"batch x m x n": "all layers", **{f"{n} ms": t * 1e3 for n, t in totals.items()},
               "svd / ours": totals["linalg.svd"] / totals["gram_svd"],
               "eigh / ours": totals["eigh of the Gram"] / totals["gram_svd"], "S max rel err": worst})


if __name__ == "__main__":
    main()
