"""sf.ops.lowrank_linear and sf.ops.lowrank_conv2d (the SEMU adapters), forward + backward while training R (x
requires grad), against their anchors in one run. Before timing, each case checks the op's output and gradients
against the official adapter's (so a forced backend, SEMU_FAST_IMPL=triton, is checked for values too).

Linear: the frozen nn.Linear (the floor), the official adapter that materialises A + U R Vh on every forward, a
peft-style unfused LoRA chain through autograd, and sf.ops.lowrank_linear (the custom op: the low-rank term
accumulated into the same output as x A^T, dR from the thin products). --memory adds each one's peak memory
(CUDA: max_memory_allocated; CPU (Linux): a fresh process's peak RSS during one step, after a warm-up
step, minus its RSS before).
Conv: CIFAR ResNet-18 3x3 convs at batch 128, 32x32 input: the frozen conv, the official adapter (materialised
A + dW through autograd) and sf.ops.lowrank_conv2d."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, alternate, backend, device_name, parser as make_parser  # noqa: E402
from semu_fast.ops import reference  # noqa: E402

LINEAR_IMPLS = {
    "frozen nn.Linear": lambda x, W, U, R, Vh: F.linear(x, W),
    "official (materialise)": lambda x, W, U, R, Vh: F.linear(x, W + U @ R @ Vh),
    "peft-style chain": lambda x, W, U, R, Vh: F.linear(x, W) + F.linear(F.linear(F.linear(x, Vh), R), U),
    "sf.ops.lowrank_linear": sf.ops.lowrank_linear,
}
# (channels, spatial size, stride) of the CIFAR ResNet-18's 3x3 convs at 32x32 input.
RESNET18_CONVS = [(64, 32, 1), (128, 16, 1), (256, 8, 1), (512, 4, 1), (64, 32, 2)]
CONV_IMPLS = {
    "frozen conv": lambda x, W, U, R, Vh, s: F.conv2d(x, W, None, s, 1),
    "official (materialise)": lambda x, W, U, R, Vh, s: reference.lowrank_conv2d(x, W, U, R, Vh, None, s, 1),
    "sf.ops.lowrank_conv2d": lambda x, W, U, R, Vh, s: sf.ops.lowrank_conv2d(x, W, U, R, Vh, None, s, 1),
}


def _linear_case(out, inp, tokens, k, device, dtype):
    W = torch.randn(out, inp, device=device, dtype=dtype) / inp ** 0.5
    x = torch.randn(tokens, inp, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, out, device=device, dtype=dtype)
    U = torch.linalg.qr(torch.randn(out, k, device=device)).Q.to(dtype)
    Vh = torch.linalg.qr(torch.randn(inp, k, device=device)).Q.T.contiguous().to(dtype)
    R = torch.zeros(k, k, device=device, dtype=dtype, requires_grad=True)
    return x, W, U, R, Vh, dy


def _step(fn, x, W, U, R, Vh, dy):
    x.grad = R.grad = None
    fn(x, W, U, R, Vh).backward(dy)


def peak_memory_mb(impl, out, inp, tokens, k, device, dtype) -> float:
    """Peak memory of one training step beyond its inputs, in MiB."""
    if device.type == "cuda":
        args = _linear_case(out, inp, tokens, k, device, dtype)
        _step(LINEAR_IMPLS[impl], *args)  # warm up (cuBLAS workspaces)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(LINEAR_IMPLS[impl], *args)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    # CPU (Linux): a fresh process; after a warm-up step, reset its RSS high-water mark (clear_refs 5) and read it
    # back after one more step.
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_lowrank as b, torch\n"
              f"a = b._linear_case({out}, {inp}, {tokens}, {k}, torch.device('cpu'), {dtype})\n"
              f"step = lambda: b._step(b.LINEAR_IMPLS[{impl!r}], *a)\n"
              "step(); a[0].grad = a[3].grad = None\n"
              "kib = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
              "before = kib('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5')\n"
              "step(); print((kib('VmHWM:') - before) / 1024)\n")
    # A fixed mmap threshold: every tensor-sized block is mapped on allocation and unmapped on free, so RSS follows
    # the live tensors (glibc otherwise keeps freed blocks of up to 32 MiB resident for reuse).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return float(res.stdout.strip().splitlines()[-1])


# Largest error against the official adapter that a case may show, relative to the output's scale.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_against_official(ours, official, inputs, dy, dtype) -> float:
    """Max error of ours vs the official adapter over y, dx and dR (relative to each one's largest entry); raises
    when it passes TOLERANCE[dtype]."""
    results = []
    for fn in (ours, official):
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(dy)
        results.append([y.detach().float()] + [t.grad.float() for t in inputs])
    err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(*results))
    if not err <= TOLERANCE[dtype]:
        raise AssertionError(f"values differ from the official adapter: relative error {err:.3g} (tolerance "
                             f"{TOLERANCE[dtype]:g} in {dtype})")
    return err


def bench_linear(args, device, dtype):
    table = Table(f"Linear adapter fwd+bwd (train R, x requires grad), {dtype}, dual_matmul backend "
                  f"{backend('dual_matmul', device)}, {device_name(device)}", args.json)
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.split("x"))
        for tokens in map(int, args.tokens.split(",")):
            for k in map(int, args.ranks.split(",")):
                case = _linear_case(out, inp, tokens, k, device, dtype)
                x, W, U, R, Vh, dy = case
                R.data.normal_()  # a trained R: the low-rank term must show in the check
                err = check_against_official(lambda: LINEAR_IMPLS["sf.ops.lowrank_linear"](x, W, U, R, Vh),
                                             lambda: LINEAR_IMPLS["official (materialise)"](x, W, U, R, Vh),
                                             [x, R], dy, dtype)
                t = alternate({name: lambda fn=fn: _step(fn, *case) for name, fn in LINEAR_IMPLS.items()}, device,
                              args.repeats)
                ours = t["sf.ops.lowrank_linear"]
                row = {"shape": shape, "tokens": tokens, "k": k, "ours ms": ours * 1e3,
                       "ours / frozen (goal <= 1.10 CPU fp32, 1.05 GPU bf16)": ours / t["frozen nn.Linear"],
                       "official / ours (goal >= 1.3 CPU)": t["official (materialise)"] / ours,
                       "peft chain / ours": t["peft-style chain"] / ours, "max rel err": err}
                if args.memory:
                    mem = {name: peak_memory_mb(name, out, inp, tokens, k, device, dtype)
                           for name in ("frozen nn.Linear", "official (materialise)", "sf.ops.lowrank_linear")}
                    row.update({"peak MiB ours": mem["sf.ops.lowrank_linear"],
                                "peak MiB official": mem["official (materialise)"],
                                "peak MiB frozen": mem["frozen nn.Linear"]})
                table.add(row)
    table.close()


def bench_conv(args, device, dtype):
    table = Table(f"Conv adapter fwd+bwd (train R, x requires grad), batch {args.batch}, {dtype}, conv_delta "
                  f"backends {backend('conv_delta_add', device)}/{backend('conv_delta_contract', device)}, "
                  f"{device_name(device)}", args.json)
    for channels, size, stride in RESNET18_CONVS[:1] if args.quick else RESNET18_CONVS:
        cin = channels // stride  # the strided conv of each stage halves the size and doubles the channels
        W = torch.randn(channels, cin, 3, 3, device=device, dtype=dtype) / (9 * cin) ** 0.5
        x = torch.randn(args.batch, cin, size, size, device=device, dtype=dtype, requires_grad=True)
        for k in map(int, args.conv_ranks.split(",")):
            U = torch.linalg.qr(torch.randn(cin, channels, k, device=device)).Q.to(dtype)
            Vh = torch.linalg.qr(torch.randn(cin, 9, k, device=device)).Q.transpose(1, 2).contiguous().to(dtype)
            R = torch.zeros(cin, k, k, device=device, dtype=dtype, requires_grad=True)
            dy = torch.empty_like(F.conv2d(x.detach(), W, None, stride, 1)).normal_()

            def step(fn):
                x.grad = R.grad = None
                fn(x, W, U, R, Vh, stride).backward(dy)

            with torch.no_grad():
                R.normal_()
            err = check_against_official(lambda: CONV_IMPLS["sf.ops.lowrank_conv2d"](x, W, U, R, Vh, stride),
                                         lambda: CONV_IMPLS["official (materialise)"](x, W, U, R, Vh, stride),
                                         [x, R], dy, dtype)

            t = alternate({name: lambda fn=fn: step(fn) for name, fn in CONV_IMPLS.items()}, device, args.repeats)
            ours = t["sf.ops.lowrank_conv2d"]
            table.add({"conv": f"{cin}->{channels} @{size} s{stride}", "k": k, "ours ms": ours * 1e3,
                       "ours / frozen (goal <= 1.15)": ours / t["frozen conv"],
                       "official / ours": t["official (materialise)"] / ours, "max rel err": err})
    table.close()


def main(argv=None):
    parser = make_parser(__doc__, repeats=3)
    parser.add_argument("--layer", choices=("linear", "conv", "both"), default="both")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="Linear out x in, comma-separated")
    parser.add_argument("--tokens", default=None, help="default 2048 on CPU, 2048,8192 on GPU")
    parser.add_argument("--ranks", default="8,64,256")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of the Linear adapters")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--conv-ranks", default="3,9", help="k per input channel (9 = full rank of a 3x3 kernel)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.tokens = args.tokens or ("2048,8192" if device.type == "cuda" else "2048")
    if args.quick:
        args.shapes, args.tokens, args.ranks, args.batch, args.conv_ranks = "96x64", "32", "4", 2, "3"
    if args.layer in ("linear", "both"):
        bench_linear(args, device, dtype)
    if args.layer in ("conv", "both"):
        bench_conv(args, device, dtype)


if __name__ == "__main__":
    main()
