"""sf.ops.accumulate_ and sf.ops.project_perpendicular_ against their anchors, in one run, on every weight of
Llama-7B-shaped decoder layers (CPU: one layer at half size; GPU: 8 full layers), plus the peak memory of a whole
gradient pass: streamed accumulation (sf.prepare's) against the official clone-and-sum pattern.

Anchors: the plain PyTorch loops of semu_fast.reference (acc.add_(g.float()); float64 projection) and the
official clone-and-sum. Reports ms, GB/s (bytes each op must move) and the ratio to our op."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import backend, device_name, emit, parser as make_parser, timeit  # noqa: E402
from semu_fast import reference  # noqa: E402

# (out, in) of one Llama-7B decoder layer: q, k, v, o, gate, up, down.
LLAMA_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def bench_ops(shapes, device, dtype, repeats):
    grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    weights = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    accs = [torch.zeros(s, device=device) for s in shapes]
    numel = sum(g.numel() for g in grads)
    esize = grads[0].element_size()
    rows = []

    def clone_and_sum():
        for a, c in zip(accs, [g.clone() for g in grads]):
            a += c

    runs = {"accumulate_": (lambda: sf.ops.accumulate_(accs, grads), numel * (esize + 8)),
            "accumulate: torch loop": (lambda: reference.accumulate_(accs, grads), numel * (esize + 8)),
            "accumulate: official clone-and-sum": (clone_and_sum, numel * (esize + 8))}
    times = {name: timeit(fn, device, repeats) for name, (fn, _) in runs.items()}
    for name, (_, moved) in runs.items():
        label = f"accumulate_ ({backend('accumulate_', device)})" if name == "accumulate_" else name
        rows.append({"op": label, "ms": times[name] * 1e3, "GB/s": moved / times[name] / 1e9,
                     "time vs ours": times[name] / times["accumulate_"]})
    # Projection: read G and W for the reductions, then read G, W and write G.
    moved = numel * (4 + esize) * 2 + numel * 4
    t_ours = timeit(lambda: sf.ops.project_perpendicular_(accs, weights, "orthogonal"), device, repeats)
    t_ref = timeit(lambda: reference.project_perpendicular(accs, weights, "orthogonal"), device, repeats)
    rows.append({"op": f"project_perpendicular_ ({backend('project_perpendicular_', device)})", "ms": t_ours * 1e3,
                 "GB/s": moved / t_ours / 1e9, "time vs ours": 1.0})
    rows.append({"op": "project: float64 reference", "ms": t_ref * 1e3, "GB/s": moved / t_ref / 1e9,
                 "time vs ours": t_ref / t_ours})
    return rows, numel


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
    accumulate_gradients(model, data, {str(i): l.weight for i, l in enumerate(model)}, loss_fn)
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


def bench_memory(shapes, device):
    """Peak memory of the gradient pass, each variant in a fresh process (CPU: peak RSS; GPU: allocator peak)."""
    weights = sum(o * i for o, i in shapes) * 4
    rows = {}
    for variant in ("streamed", "clone-and-sum"):
        out = subprocess.run([sys.executable, "-c", _PASS, json.dumps(shapes), variant, device.type],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return [{"gradient pass": k, "peak over model (GB)": v / 1e9, "x fp32 weights": v / weights,
             "vs streamed": v / rows["streamed"]} for k, v in rows.items()]


def main(argv=None):
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--scale", type=float, default=None, help="shrink each dim (default 0.5 on CPU, 1 on GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    layers = args.layers or (8 if device.type == "cuda" else 1)
    scale = args.scale or (1.0 if device.type == "cuda" else 0.5)
    shapes = [(int(o * scale), int(i * scale)) for o, i in LLAMA_LAYER] * layers
    rows, numel = bench_ops(shapes, device, getattr(torch, args.dtype), args.repeats)
    title = f"{len(shapes)} Llama-shaped weights ({numel / 1e6:.0f}M elements, {args.dtype}), {device_name(device)}"
    emit(rows, f"accumulate_ / project_perpendicular_: {title}")
    # The memory pass runs a real backward through the stack: a chain of the (in -> out) maps that compose.
    chain = [(int(4096 * scale), int(4096 * scale))] * 4 + [(int(11008 * scale), int(4096 * scale)),
                                                              (int(4096 * scale), int(11008 * scale))]
    mem = bench_memory(chain, device)
    emit(mem, f"gradient pass peak memory (6 Linear layers, 4 batches), {device_name(device)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ops": rows, "memory": mem, "title": title}, indent=2))


if __name__ == "__main__":
    main()
