"""`semu-fast` (also `python -m semu_fast`): SEMU from the command line.

`semu-fast unlearn` with no data arguments runs the embedded default: a small CNN trained on scikit-learn's bundled
digits (cached) forgets class 0 with SEMU next to the FT, GA, RL and Retrain baselines; the metrics table is printed
and report.md, metrics.json and plots are written to ./semu_fast_out. `unlearn-llm` (cli_llm) and `unlearn-ddpm` /
`unlearn-sd` (cli_diffusion) run the LLM and diffusion workflows."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from semu_fast import cli_args, cli_diffusion, cli_llm
from semu_fast.cli_args import fraction, gamma, positive

log = logging.getLogger("semu_fast")


def _methods(text: str) -> tuple:
    from semu_fast.baselines import METHODS

    names = () if text.strip().lower() == "none" else tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(METHODS)} or 'none'")
    return names


def _scenario(args, parser):
    """(task, original model, split) from the shared data and scenario flags; flag errors name the flag."""
    from semu_fast import classification as C

    try:
        task = C.load_task(args.dataset, args.data, args.seed, args.image_size)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    forget_class = args.forget_class if args.forget_class is not None or args.num_forget else 0
    if forget_class is not None and not 0 <= forget_class < task.num_classes:
        parser.error(f"argument --forget-class: must be in [0, {task.num_classes}) for {task.name}, "
                     f"got {forget_class}")
    try:
        split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class,
                               args.num_forget, getattr(args, "retain_fraction", 0.0), args.seed)
        model = C.original_model(task, args.arch, args.checkpoint, args.cache_dir, args.seed, args.train_epochs,
                                 progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    scenario = {"dataset": task.name, "arch": args.arch or task.default_arch, "forget_class": forget_class,
                "num_forget": args.num_forget, "forget_samples": len(split.forget),
                "retain_fraction": getattr(args, "retain_fraction", 0.0), "seed": args.seed}
    return task, model, split, scenario


def _unlearn(args, parser) -> int:
    import torch

    import semu_fast as sf
    from semu_fast import classification as C, results

    torch.manual_seed(args.seed)
    task, model, split, scenario = _scenario(args, parser)
    retrain = args.retrain if args.retrain is not None else task.name == "digits"
    retrain_fn = None
    if args.retrain_checkpoint is not None:
        retrain_fn = lambda: C.load_checkpoint(C.build_model(scenario["arch"], task.num_classes,  # noqa: E731
                                                             task.in_channels), args.retrain_checkpoint)
    elif retrain:
        retrain_fn = lambda: C.train_model(task, scenario["arch"], split.retain, args.seed,  # noqa: E731
                                           args.train_epochs, not args.quiet, "Retrain")
    config = sf.SEMUConfig(gamma=args.gamma, seed=args.seed)
    semu = {"optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs}
    result = C.run(task, model, split, config=config, semu_settings=semu, methods=args.baselines,
                   retrain=retrain_fn, seed=args.seed, progress=not args.quiet)
    scenario.update(gamma=args.gamma, semu=semu)
    print(results.format_table(result["metrics"]))
    files = results.write(args.out, result, scenario)
    result["semu_model"].save_adapters(args.out / "adapters")
    files.append("adapters/")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def _eval(args, parser) -> int:
    import semu_fast as sf
    from semu_fast import classification as C, metrics, results

    task, model, split, scenario = _scenario(args, parser)
    loaders = C.make_loaders(task, split, args.seed)
    table = {"original": metrics.evaluate(model, loaders.forget_eval, loaders.retain_eval, loaders.test_eval)}
    if args.adapters is not None:
        try:
            semu_model = sf.load_adapters(model, args.adapters)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"argument --adapters: {err}")
        table["semu"] = {**metrics.evaluate(semu_model, loaders.forget_eval, loaders.retain_eval, loaders.test_eval),
                         "trainable_share": semu_model.report.trainable_share}
    print(results.format_table(table))
    if args.json is not None:
        args.json.write_text(json.dumps({"scenario": scenario, "metrics": table}, indent=2))
    return 0


def _report(args, parser) -> int:
    from semu_fast import results

    try:
        files = results.render(args.folder)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(results.format_table(json.loads((args.folder / "metrics.json").read_text())))
    print(f"wrote {', '.join(files)} to {args.folder}")
    return 0


def _info(args, parser) -> int:
    from semu_fast._backends import describe

    print(describe())
    return 0


def _data_flags() -> argparse.ArgumentParser:
    """The flags that say which model forgets what: shared by unlearn and eval."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=("digits", "cifar10", "cifar100", "imagefolder"), default="digits",
                   help="digits is bundled with scikit-learn; the others read --data (nothing is downloaded)")
    g.add_argument("--data", type=Path, default=None, help="local root of CIFAR (python version) or an ImageFolder "
                   "with train/ and test/ (or val/)")
    g.add_argument("--image-size", type=positive(int), default=32, help="ImageFolder images are resized to this")
    g.add_argument("--arch", default=None, help="digits-cnn, resnet18-cifar (SalUn's) or a torchvision model name; "
                   "default: digits-cnn for digits, resnet18-cifar otherwise")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="the trained model: a state dict or a SalUn checkpoint (.pth.tar with 'state_dict')")
    g.add_argument("--train-epochs", type=positive(int), default=None,
                   help="train the original (and Retrain) here for this many epochs when there is no checkpoint")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where models trained here are cached (default {cli_args.default_cache()})")
    g = p.add_argument_group("scenario (as SalUn)")
    g.add_argument("--forget-class", type=int, default=None, metavar="C",
                   help="class-wise forgetting of class C (default 0 unless --num-forget is given alone)")
    g.add_argument("--num-forget", type=positive(int), default=None, metavar="N",
                   help="forget N random samples (of class C when --forget-class is given too)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the models trained here and SEMU")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semu-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = _data_flags()
    un = sub.add_parser("unlearn", parents=[data], help="forget with SEMU next to the baselines, write a report "
                        "(default: the bundled digits)")
    un.add_argument("--retain-fraction", type=fraction, default=0.0, metavar="F",
                    help="share of the retain set unlearning may use (0 = data-free, the default)")
    un.add_argument("--gamma", type=gamma, default=0.95, help="explained-variance threshold in (0, 1]")
    un.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    un.add_argument("--lr", type=positive(float), default=5e-3, help="SEMU's learning rate for R")
    un.add_argument("--epochs", type=positive(int), default=15, help="SEMU's epochs over the forget set")
    un.add_argument("--baselines", type=_methods, default=("ft", "ga", "rl"),
                    help="comma-separated among ft, ga, rl, or 'none' (default ft,ga,rl)")
    un.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=None,
                    help="train a Retrain model (retain data only) for the table and Avg. Gap; default on for digits")
    un.add_argument("--retrain-checkpoint", type=Path, default=None, help="a trained Retrain model to compare with")
    un.add_argument("--out", type=Path, default=Path("semu_fast_out"),
                    help="folder for metrics.json, run.json, report.md and plots (default ./semu_fast_out)")
    un.set_defaults(func=_unlearn)
    ev = sub.add_parser("eval", parents=[data], help="SalUn's metrics of the original model (and of saved SEMU "
                        "adapters on it)")
    ev.add_argument("--adapters", type=Path, default=None, help="a folder written by save_adapters")
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    ev.set_defaults(func=_eval)
    rep = sub.add_parser("report", help="rebuild report.md and the plots of a results folder")
    rep.add_argument("folder", type=Path, help="a folder written by semu-fast unlearn")
    rep.set_defaults(func=_report)
    info = sub.add_parser("info", help="which backend serves each op here, and why the others do not")
    info.set_defaults(func=_info)
    cli_llm.register(sub)
    cli_diffusion.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = cli_args.default_cache()
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    if quiet:  # also where the calling program set up logging already (basicConfig then does nothing)
        log.setLevel(logging.WARNING)
    command = parser._subparsers._group_actions[0].choices[args.command]
    return args.func(args, command)


if __name__ == "__main__":
    sys.exit(main())
