"""SEMU's trainable share on SalUn's CIFAR ResNet-18 (the paper reports under 1%), measured with random forget data:
random-init weights (no trained checkpoint is available offline) and 512 random 32x32 images with random labels.

    python benchmarks/trainable_share_resnet18.py [--samples 512] [--gammas 0.9,0.95,0.99] [--json F]"""
from __future__ import annotations

import argparse
import json

import torch

import semu_fast as sf
from semu_fast.classification import resnet18_cifar


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--gammas", default="0.9,0.95,0.99")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.samples,), generator=gen)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, args.samples, 128)]
    rows = []
    for gamma in map(float, args.gammas.split(",")):
        for conv_rank in ("max", "per_channel"):
            torch.manual_seed(0)
            sm = sf.prepare(resnet18_cifar(10), batches, config=sf.SEMUConfig(gamma=gamma, conv_rank=conv_rank))
            report = sm.report
            rows.append({"gamma": gamma, "conv_rank": conv_rank, "trainable params": report.trainable_params,
                         "trainable %": round(report.trainable_share, 3),
                         "mean k of convs": round(sum(l.k for l in report.layers if l.kind == "conv2d")
                                                  / sum(l.kind == "conv2d" for l in report.layers), 2)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
