"""`semu-fast` (also `python -m semu_fast`): SEMU from the command line.

`semu-fast unlearn` with no data arguments runs the embedded default: a small CNN trained on scikit-learn's bundled
digits forgets one class with SEMU, and the per-layer ranks, trainable share and accuracies are printed."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("semu_fast")


def _gamma(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _default_cache() -> Path:
    return Path(os.environ.get("SEMU_FAST_CACHE", Path.home() / ".cache" / "semu_fast"))


def _unlearn(args) -> int:
    import torch

    import semu_fast as sf
    from semu_fast.digits import load_digits_split, loader, pretrained_digits_cnn
    from semu_fast.training import accuracy

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    model = pretrained_digits_cnn(args.cache_dir, args.seed, progress=not args.quiet)
    forget = y_train == args.forget_class
    forget_loader = loader(x_train[forget], y_train[forget], shuffle=True, seed=args.seed)
    retain_loader = loader(x_train[~forget], y_train[~forget])
    test_keep = y_test != args.forget_class
    test_loader = loader(x_test[test_keep], y_test[test_keep])

    def metrics(m):
        return {"forget_acc": accuracy(m, forget_loader), "retain_acc": accuracy(m, retain_loader),
                "test_acc": accuracy(m, test_loader)}

    before = metrics(model)
    config = sf.SEMUConfig(gamma=args.gamma, seed=args.seed)
    semu_model, report = sf.unlearn(model, forget_loader, config=config, optimizer=args.optimizer, lr=args.lr,
                                    epochs=args.epochs, progress=not args.quiet)
    after = metrics(semu_model)
    print(report)
    print(f"{'':12s} {'forget acc':>10s} {'retain acc':>10s} {'test acc':>10s}")
    for name, m in (("original", before), ("semu", after)):
        print(f"{name:12s} {m['forget_acc']:10.2f} {m['retain_acc']:10.2f} {m['test_acc']:10.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        semu_model.save_adapters(args.out / "adapters")
        summary = {"original": before, "semu": after, "report": report.to_dict()}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return 0


def _info(args) -> int:
    from semu_fast._backends import describe

    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semu-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    un = sub.add_parser("unlearn", help="forget a class of the bundled digits with SEMU (the embedded default)")
    un.add_argument("--forget-class", type=int, default=0, choices=range(10), metavar="C", help="class to forget")
    un.add_argument("--gamma", type=_gamma, default=0.95, help="explained-variance threshold in (0, 1]")
    un.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    un.add_argument("--lr", type=_positive(float), default=1e-2)
    un.add_argument("--epochs", type=_positive(int), default=5)
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--cache-dir", type=Path, default=None,
                    help=f"where the trained digits CNN is cached (default {_default_cache()})")
    un.add_argument("--out", type=Path, default=None, help="folder for adapters and summary.json")
    un.add_argument("--quiet", action="store_true", help="no progress bars")
    un.set_defaults(func=_unlearn)
    info = sub.add_parser("info", help="which backend serves each op here, and why the others do not")
    info.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = _default_cache()
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
