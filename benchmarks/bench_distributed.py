"""The SVD phase of sf.prepare on 1 and on 2 ranks (torch.distributed, gloo on CPU / nccl on GPU), one thread per
rank on CPU: layer-sharded SVDs plus the broadcast of the factors against one process doing every SVD.
Also reports the one-process run with as many threads as the two ranks have together."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, device_name, parser as make_parser  # noqa: E402


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])


def _batches(width: int, tokens: int, rank: int = 0, world: int = 1):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(tokens, width, generator=gen), torch.randint(0, width, (tokens,), generator=gen))
               for _ in range(4)]
    return batches[rank::world]


def _config(svd: str) -> sf.SEMUConfig:
    return sf.SEMUConfig(gamma=0.9, svd=svd)


def _svd_seconds(model, batches, svd, **kw) -> float:
    return sf.prepare(model, batches, config=_config(svd), **kw).report.timings["svd"]


def _worker(rank, world, init_file, args, out_file, backend):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    try:
        shard = _batches(args.width, args.tokens, rank, world)
        times = [_svd_seconds(_model(args.layers, args.width).to(device), shard, args.svd)
                 for _ in range(args.repeats)]
        t = torch.tensor([sorted(times)[len(times) // 2]], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            Path(out_file).write_text(str(t.item()))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = make_parser(__doc__, repeats=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--svd", default="exact", choices=("exact", "randomized", "auto"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.layers, args.width, args.tokens, args.repeats = 2, 32, 16, 1
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("bench_distributed: needs 2 GPUs for the CUDA case; skipped")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = sorted(_svd_seconds(_model(args.layers, args.width).to(device), _batches(args.width, args.tokens),
                                 args.svd, distributed=False) for _ in range(args.repeats))[args.repeats // 2]
    torch.set_num_threads(max(threads, 2))
    single_all = sorted(_svd_seconds(_model(args.layers, args.width).to(device), _batches(args.width, args.tokens),
                                     args.svd, distributed=False) for _ in range(args.repeats))[args.repeats // 2]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), args, out, backend), nprocs=2, join=True)
        two = float(Path(out).read_text())
    with Table(f"SVD phase of sf.prepare on 1 and 2 ranks ({backend}), {device_name(device)}", args.json) as table:
        table.add({"layers": f"{args.layers} x Linear {args.width}^2", "svd": args.svd, "1 rank, 1 thread s": single,
                   "2 ranks, 1 thread each s": two, "speed-up 1 -> 2 ranks": single / two,
                   f"1 rank, {max(threads, 2)} threads s": single_all})


if __name__ == "__main__":
    main()
