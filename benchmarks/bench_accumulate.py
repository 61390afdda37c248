"""sf.ops.accumulate_ against its anchors, in one run, on every weight of Llama-7B-shaped decoder layers (GPU: 8
full layers; CPU: one layer at half size), all weights in one call and one weight per call (the gradient hook's
path); plus the peak memory of a whole gradient pass: streamed accumulation (sf.prepare's) against the official
clone-and-sum.

Anchors, interleaved with ours in one run after a check that every one gives the reference's values: the best
composed PyTorch versions (a loop of acc.add_(g) and torch._foreach_add_(accs, grads), both adding a bf16/fp16
gradient into the float32 accumulator without a float32 copy), the loop of semu_fast.ops.reference (which makes one:
acc.add_(g.float())) and the official clone-and-sum. Reports ms, GB/s (bytes the op must move: read the gradient,
read and write the float32 accumulator) and, on a GPU of known bandwidth, the share of its peak."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, alternate, backend, check_close, device_name, parser as make_parser  # noqa: E402
from semu_fast.ops import reference  # noqa: E402

# (out, in) of one Llama-7B decoder layer: q, k, v, o, gate, up, down.
LLAMA_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
# HBM bandwidth by GPU name (bytes/s), for the share-of-peak column.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def llama_shapes(device: torch.device, quick: bool, layers=None, scale=None) -> list:
    if quick:
        return [(64, 48), (48, 64), (7, 5)]
    layers = layers or (8 if device.type == "cuda" else 1)
    scale = scale or (1.0 if device.type == "cuda" else 0.5)
    return [(int(o * scale), int(i * scale)) for o, i in LLAMA_LAYER] * layers


def bench_ops(shapes, device, dtype, repeats, table):
    grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    accs = [torch.zeros(s, device=device) for s in shapes]
    moved = sum(g.numel() for g in grads) * (grads[0].element_size() + 8)
    peak = peak_bandwidth(device)

    def clone_and_sum():
        for a, c in zip(accs, [g.clone() for g in grads]):
            a += c

    runs = {f"accumulate_ ({backend('accumulate_', device)}), one call": lambda: sf.ops.accumulate_(accs, grads),
            "accumulate_, one call per weight": lambda: [sf.ops.accumulate_([a], [g]) for a, g in zip(accs, grads)],
            "torch loop acc.add_(g)": lambda: [a.add_(g) for a, g in zip(accs, grads)],
            "torch._foreach_add_(accs, grads)": lambda: torch._foreach_add_(accs, grads),
            "torch loop with a float32 copy (reference)": lambda: reference.accumulate_(accs, grads),
            "official clone-and-sum": clone_and_sum}
    start = [torch.randn(s, device=device) for s in shapes]
    for name, fn in runs.items():  # each adds the gradients once to the same start: the reference's sums
        for a, s in zip(accs, start):
            a.copy_(s)
        fn()
        for a, s, g in zip(accs, start, grads):
            check_close(name, a, s.double() + g.double(), atol=1e-5, rtol=1e-6)
    times = alternate(runs, device, repeats)
    ours = times[next(iter(runs))]
    for name, t in times.items():
        row = {"op": name, "ms": t * 1e3, "GB/s": moved / t / 1e9, "time vs ours": t / ours}
        if peak:
            row["% of HBM peak"] = 100 * moved / t / peak
        table.add(row)


def bench_memory(shapes, device, table):
    """Peak memory of the gradient pass, each variant in a fresh process (CPU: peak RSS; GPU: allocator peak)."""
    weights = sum(o * i for o, i in shapes) * 4
    peaks = {}
    for variant in ("streamed", "clone-and-sum"):
        out = subprocess.run([sys.executable, "-c", _PASS, json.dumps(shapes), variant, device.type],
                             capture_output=True, text=True, check=True)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    for variant, peak in peaks.items():
        table.add({"gradient pass": variant, "peak over model (GB)": peak / 1e9, "x fp32 weights": peak / weights,
                   "vs streamed": peak / peaks["streamed"]})


_PASS = r"""
import json, sys, torch
import torch.nn as nn
from semu_fast.gradients import accumulate_gradients
shapes, variant, device, batches = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], 4
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in shapes]).to(device)
x = torch.randn(8, shapes[0][1], device=device)
data = [(x, None)] * batches
loss_fn = lambda m, b: m(b[0]).square().mean()
def status(field):  # Linux: VmRSS (now) or VmHWM (peak since the last reset), in bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS")
if variant == "streamed":
    accumulate_gradients(model, data, {str(i): l for i, l in enumerate(model)}, loss_fn)
else:  # the official code: per-batch gradients cloned, then summed
    total = None
    for batch in data:
        model.zero_grad()
        loss_fn(model, batch).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
peak = torch.cuda.max_memory_allocated() if device == "cuda" else status("VmHWM")
print(json.dumps({"peak_bytes": peak - base}))
"""



def main(argv=None):
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--scale", type=float, default=None, help="shrink each dim (default 0.5 on CPU, 1 on GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = llama_shapes(device, args.quick, args.layers, args.scale)
    numel = sum(o * i for o, i in shapes)
    with Table(f"accumulate_: {len(shapes)} Llama-shaped weights ({numel / 1e6:.0f}M elements, {args.dtype} "
               f"gradients), {device_name(device)}", args.json) as table:
        bench_ops(shapes, device, getattr(torch, args.dtype), args.repeats, table)
    # The memory pass runs a real backward through the stack: a chain of the (in -> out) maps that compose.
    scale = 0.01 if args.quick else (args.scale or (1.0 if device.type == "cuda" else 0.5))
    chain = [(int(4096 * scale), int(4096 * scale))] * 4 + [(int(11008 * scale), int(4096 * scale)),
                                                              (int(4096 * scale), int(11008 * scale))]
    with Table(f"gradient pass peak memory (6 Linear layers, 4 batches), {device_name(device)}", args.json) as table:
        bench_memory(chain, device, table)


if __name__ == "__main__":
    main()
