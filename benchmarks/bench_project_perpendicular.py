"""sf.ops.project_perpendicular_ (in place, float64 reductions, returns the energies) against two anchors, interleaved
in one run: the best composed PyTorch version (in place: float64 dot products for c, then g.addcmul_(w, -c)) and the
float64 reference (semu_fast.ops.reference.project_perpendicular, out of place), on the weights of Llama-7B-shaped
decoder layers (GPU: 8 full layers; CPU: one layer at half size). Values are checked against the reference first.
Reports ms, GB/s (the bytes a two-pass projection must move: read G and W for the reductions, then read G and W and
write G) and, on a GPU of known bandwidth, the share of its peak."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from bench_accumulate import llama_shapes, peak_bandwidth  # noqa: E402
from common import Table, alternate, backend, check_close, device_name, parser as make_parser  # noqa: E402
from semu_fast.ops import reference  # noqa: E402


def main(argv=None):
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--scale", type=float, default=None, help="shrink each dim (default 0.5 on CPU, 1 on GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="the weights' dtype (the gradients are float32 accumulators)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    shapes = llama_shapes(device, args.quick, args.layers, args.scale)
    dtype = getattr(torch, args.dtype)
    grads = [torch.randn(s, device=device) for s in shapes]
    weights = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    numel = sum(g.numel() for g in grads)
    moved = numel * (4 + weights[0].element_size()) * 2 + numel * 4
    peak = peak_bandwidth(device)

    def composed(gs):
        for g, w in zip(gs, weights):
            w64 = w.double().reshape(-1)
            norm = torch.dot(w64, w64)
            c = torch.dot(g.double().reshape(-1), w64) / torch.where(norm > 0, norm, 1.0)
            g.addcmul_(w, -c.float())  # g - c w, computed in g's float32

    expected = reference.project_perpendicular(grads, weights, "orthogonal")
    for name, fn in (("project_perpendicular_", sf.ops.project_perpendicular_), ("composed", composed)):
        got = [g.clone() for g in grads]
        fn(got, weights, "orthogonal") if fn is not composed else fn(got)
        for g, e in zip(got, expected):
            check_close(name, g, e, atol=1e-5, rtol=1e-5)
    ours_name = f"project_perpendicular_ ({backend('project_perpendicular_', device)})"
    times = alternate({ours_name: lambda: sf.ops.project_perpendicular_(grads, weights, "orthogonal"),
                       "composed PyTorch (float64 dots, in-place addcmul_)": lambda: composed(grads),
                       "float64 reference (out of place)": lambda: reference.project_perpendicular(
                           grads, weights, "orthogonal")}, device, args.repeats)
    t_ours = times[ours_name]
    with Table(f"project_perpendicular_: {len(shapes)} Llama-shaped weights ({numel / 1e6:.0f}M elements, "
               f"{args.dtype} weights), {device_name(device)}", args.json) as table:
        for name, t in times.items():
            row = {"op": name, "ms": t * 1e3, "GB/s": moved / t / 1e9, "time vs ours": t / t_ours}
            if peak:
                row["% of HBM peak"] = 100 * moved / t / peak
            table.add(row)


if __name__ == "__main__":
    main()
