"""SEMU's trainable share on SalUn's CIFAR ResNet-18 (the paper reports under 1%), measured with random forget data:
random-init weights (no trained checkpoint is available offline) and 512 random 32x32 images with random labels.

    python benchmarks/quality/trainable_share_resnet18.py [--samples 512] [--gammas 0.9,0.95,0.99] [--json F]"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import semu_fast as sf  # noqa: E402
from common import Table, device_name, parser as make_parser  # noqa: E402
from semu_fast.workflows.models import resnet18_cifar  # noqa: E402


def main(argv=None):
    parser = make_parser(__doc__, repeats=None)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--gammas", default="0.9,0.95,0.99")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.gammas = 8, "0.9"
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.samples,), generator=gen)
    batches = [(x[i:i + 128].to(device), y[i:i + 128].to(device)) for i in range(0, args.samples, 128)]
    table = Table(f"trainable share of SalUn's CIFAR ResNet-18, random weights and data, {device_name(device)}",
                  args.json)
    for gamma in map(float, args.gammas.split(",")):
        for conv_rank in ("max", "per_channel"):
            torch.manual_seed(0)
            sm = sf.prepare(resnet18_cifar(10).to(device), batches,
                            config=sf.SEMUConfig(gamma=gamma, conv_rank=conv_rank))
            report = sm.report
            convs = [layer.k for layer in report.layers if layer.kind == "conv2d"]
            table.add({"gamma": gamma, "conv_rank": conv_rank, "trainable params": report.trainable_params,
                       "trainable %": round(report.trainable_share, 3),
                       "mean k of convs": round(sum(convs) / len(convs), 2)})
    table.close()


if __name__ == "__main__":
    main()
