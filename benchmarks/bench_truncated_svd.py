"""sf.ops.truncated_svd (choosing k itself) against its anchors, in one run, on gradient-like matrices (a decaying
spectrum plus noise): torch.linalg.svd + the rank rule (the reference), and torch.svd_lowrank told the exact k in
advance (q = k + 32, niter = 2). Also checks the contract: captured variance >= gamma, k within max(2, 2%) of the
exact k, and the relative error of the leading singular values."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, device_name, parser as make_parser, timeit  # noqa: E402
from semu_fast.ops import svd_plan  # noqa: E402
from semu_fast.ops.svd import select_rank  # noqa: E402


def gradient_like(m: int, n: int, device, seed: int = 0, decay: float = 0.015, noise: float = 0.05) -> torch.Tensor:
    """U diag(exp(-decay i)) V^T plus Gaussian noise scaled to a fixed share of the energy: a heavy-tailed,
    gradient-like spectrum."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, generator=gen, device=device)).Q
    V = torch.linalg.qr(torch.randn(n, q, generator=gen, device=device)).Q
    s = torch.exp(-decay * torch.arange(q, device=device, dtype=torch.float32))
    G = (U * s) @ V.T
    E = torch.randn(m, n, generator=gen, device=device)
    return G + E * (noise * G.norm() / E.norm())


def main(argv=None):
    parser = make_parser(__doc__, repeats=3)
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--gammas", default="0.9,0.95")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.shapes = "300x260"
    svd_plan.costs(device)  # the cached SVD cost calibration, or measured now: before any clock starts
    table = Table(f"truncated_svd on {device_name(device)} (linalg.svd once per shape)", args.json)
    broken = []
    for shape in args.shapes.split(","):
        m, n = map(int, shape.split("x"))
        G = gradient_like(m, n, device)
        U_ex, S_ex, _ = torch.linalg.svd(G, full_matrices=False)  # also warms the solver up for the timing below
        t_full = timeit(lambda: torch.linalg.svd(G, full_matrices=False), device, repeats=1, warmup=0)
        total = G.double().square().sum()
        for gamma in map(float, args.gammas.split(",")):
            k_exact = int(select_rank(S_ex, gamma))
            q = min(k_exact + 32, min(m, n))
            t_lowrank = timeit(lambda: torch.svd_lowrank(G, q=q, niter=2), device, args.repeats)
            gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
            t_ours = timeit(lambda: sf.ops.truncated_svd(G, gamma, generator=gen()), device, args.repeats)
            U, S, Vh = sf.ops.truncated_svd(G, gamma, generator=gen())
            k = S.shape[-1]
            captured = float((U.T @ G).double().square().sum() / total)
            lead = min(k, k_exact)
            s_err = float(((S[:lead] - S_ex[:lead]) / S_ex[:lead]).abs().max())
            row = table.add({"shape": shape, "gamma": gamma, "k exact": k_exact, "k": k,
                       "captured": captured, "S rel err (max)": s_err,
                       "ms": t_ours * 1e3, "x faster than linalg.svd": t_full / t_ours,
                       "time vs svd_lowrank(told k)": t_ours / t_lowrank,
                       "contract ok": captured >= gamma - 1e-6 and k <= k_exact + max(2, 0.02 * k_exact)})
            if not row["contract ok"]:
                broken.append(f"{shape} gamma {gamma}")
    if broken:  # the rows stay printed and written; the run fails
        sys.exit(f"truncated_svd broke its contract (captured >= gamma, k within max(2, 2%) of exact) on "
                 f"{', '.join(broken)}")


if __name__ == "__main__":
    main()
