"""`semu-fast unlearn`, `semu-fast eval` and `semu-fast report`: classification unlearning as SalUn sets it up.

`semu-fast unlearn` with no data arguments runs the embedded default: a small CNN trained on scikit-learn's bundled
digits (cached) forgets class 0 with SEMU next to the FT, GA, RL and Retrain baselines; the metrics table is printed
and report.md, metrics.json, run.json, plots and the adapters are written to ./semu_fast_out."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .._utils import default_cache
from ._common import (add_device_flag, add_preset_flag, add_run_flags, add_training_flags, finish_run, fraction,
                      library_error, named_paths, positive, preset_options, seed)


def _methods(text: str) -> tuple:
    from ..workflows.baselines import METHODS

    names = () if text.strip().lower() == "none" else tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(METHODS)} or 'none'")
    return names


def _scenario(args, parser):
    """(task, original model, split, scenario dict) from the shared data and scenario flags; flag errors name the
    flag."""
    from ..workflows import classification as C

    if args.dataset == "digits" and (args.data is not None or args.image_size != 32):
        parser.error(f"argument {'--data' if args.data is not None else '--image-size'}: the bundled digits task "
                     f"reads neither --data nor --image-size; give --dataset cifar10, cifar100 or imagefolder")
    try:
        task = C.load_task(args.dataset, args.data, args.seed, args.image_size)
    except (ValueError, FileNotFoundError) as err:
        library_error(parser, err)
    forget_class = args.forget_class if args.forget_class is not None or args.num_forget else 0
    if forget_class is not None and not 0 <= forget_class < task.num_classes:
        parser.error(f"argument --forget-class: must be in [0, {task.num_classes}) for {task.name}, "
                     f"got {forget_class}")
    official = getattr(args, "preset", "ours") == "official"
    if official and getattr(args, "retain_fraction", 0.0):
        parser.error("argument --retain-fraction: the official preset reads the whole retain set (its early exit "
                     "scores on it); leave --retain-fraction out")
    try:
        if official:
            split = C.salun_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class,
                                  args.num_forget, args.seed, C.official_counted_class_in_test(task.name))
        else:
            split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class,
                                   args.num_forget, getattr(args, "retain_fraction", 0.0), args.seed)
        cache_dir = args.cache_dir or default_cache()
        model = C.original_model(task, args.arch, args.checkpoint, cache_dir, args.seed, args.train_epochs,
                                 progress=not args.quiet, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        library_error(parser, err)
    source = Path(args.checkpoint).resolve() if args.checkpoint else C.cached_model_path(
        task, args.arch, args.seed, args.train_epochs, cache_dir)
    scenario = {"dataset": task.name, "arch": args.arch or task.default_arch, "preset": "official" if official
                else "ours", "forget_class": forget_class,
                "num_forget": args.num_forget, "forget_samples": len(split.forget),
                "retain_fraction": getattr(args, "retain_fraction", 0.0), "seed": args.seed, "device": args.device,
                "original_model": str(source), "original_sha256": C.state_digest(model)[:16]}
    return task, model, split, scenario


def run_unlearn(args, parser) -> int:
    import torch

    import semu_fast as sf
    from ..workflows import classification as C, results

    if args.seed is None:  # SalUn's default seed for the official preset (its split draws with seed - 1)
        args.seed = 2 if args.preset == "official" else 0
    if args.preset == "official" and args.seed < 1:
        parser.error(f"argument --seed: the official preset draws SalUn's split with seed - 1, so it needs a seed >= 1 "
                     f"(SalUn's default 2), got {args.seed}")
    torch.manual_seed(args.seed)
    if args.retrain_checkpoint is not None and not args.retrain_checkpoint.is_file():
        parser.error(f"argument --retrain-checkpoint: {args.retrain_checkpoint} is not a file")
    if args.retrain_checkpoint is not None and args.retrain is False:
        parser.error("argument --retrain-checkpoint: it is the Retrain model, which --no-retrain leaves out; give "
                     "one of the two")
    task, model, split, scenario = _scenario(args, parser)
    retrain = args.retrain if args.retrain is not None else task.name == "digits"
    retrain_fn = None
    if args.retrain_checkpoint is not None:  # read now: a bad file must not wait until every method has trained
        try:
            retrained = C.load_checkpoint(C.build_model(scenario["arch"], task.num_classes, task.in_channels,
                                                        task.name).to(args.device), args.retrain_checkpoint)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"argument --retrain-checkpoint: {err}")
        retrain_fn = lambda: retrained  # noqa: E731
    elif retrain:
        retrain_fn = lambda: C.train_model(task, scenario["arch"], split.retain, args.seed,  # noqa: E731
                                           args.train_epochs, not args.quiet, "Retrain", args.device)
    flags = {"gamma": args.gamma, "optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs}
    if args.preset == "official":
        semu = preset_options("official-classification", args, flags, seed=args.seed)
        config = semu.pop("config")
    else:
        config = sf.SEMUConfig(gamma=args.gamma, seed=args.seed)
        semu = {k: v for k, v in flags.items() if k != "gamma"}
    stop = args.stop_at_test_accuracy
    if stop is None:
        stop = args.num_forget is not None and args.preset != "official"
    try:
        semu_model, report, result = C.run(task, model, split, config=config, semu_settings=semu,
                                           methods=args.baselines, retrain=retrain_fn, seed=args.seed,
                                           augment=args.preset == "official", stop_at_test_accuracy=stop,
                                           progress=not args.quiet)
    except ValueError as err:  # as unlearn-llm / unlearn-sd: what the workflow refuses, not a traceback
        library_error(parser, err)
    scenario.update(gamma=config.gamma, preset=args.preset, stop_at_test_accuracy=stop,
                    semu={**semu, "semu_config": config.to_dict()})
    files = results.write_classification(args.out, semu_model, report, result, scenario)
    results.record_run(args.out, files, named_paths(args))
    return finish_run(args.out, files, [results.format_table(result["metrics"])])


def _saved_scenario(adapters: Optional[Path]) -> dict:
    """The scenario of the semu-fast unlearn run whose folder holds `adapters` (its run.json), or {}."""
    from ..workflows import results

    run_file = adapters.parent / "run.json" if adapters is not None else None
    if run_file is None or not run_file.is_file():
        return {}
    try:
        saved = results.read_json(run_file)
    except (OSError, ValueError):
        return {}
    scenario = saved.get("scenario") if isinstance(saved, dict) else None
    return scenario if isinstance(scenario, dict) else {}


def _check_same_scenario(saved: dict, scenario: dict, parser) -> None:
    """Adapters inside a semu-fast unlearn folder come with its run.json: evaluating them on another scenario (another
    forgotten class, split, seed or dataset) would report its metrics as theirs."""
    flags = {"dataset": "--dataset", "preset": "--preset", "forget_class": "--forget-class",
             "num_forget": "--num-forget", "seed": "--seed"}
    differ = [f"{flags[key]} {saved[key]} (here {scenario[key]})" if saved[key] is not None else
              f"no {flags[key]} (here {scenario[key]})" for key in flags
              if key in saved and saved[key] != scenario.get(key)]
    if differ:
        parser.error(f"argument --adapters: they were made for another scenario: give {', '.join(differ)}")


def run_eval(args, parser) -> int:
    import semu_fast as sf
    from .. import metrics
    from ..model import BaseMismatchError
    from ..workflows import classification as C, results

    if args.adapters is not None and not args.adapters.is_dir():
        parser.error(f"argument --adapters: {args.adapters} is not a folder (give the folder save_adapters wrote)")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"argument --json: the folder {args.json.parent} does not exist")
    saved = _saved_scenario(args.adapters)
    if args.preset is None:  # the split of the run that made the adapters
        args.preset = saved.get("preset") if saved.get("preset") in ("ours", "official") else "ours"
    if args.preset == "official" and args.seed < 1:
        parser.error(f"argument --seed: the official split is drawn with seed - 1, so it needs a seed >= 1, got "
                     f"{args.seed}")
    task, model, split, scenario = _scenario(args, parser)
    loaders = C.make_loaders(task, split, args.seed)
    _check_same_scenario(saved, scenario, parser)
    table = {"original": metrics.evaluate(model, loaders.forget_eval, loaders.retain_eval, loaders.test_eval)}
    if args.adapters is not None:
        try:
            semu_model = sf.load_adapters(model, args.adapters)
        except BaseMismatchError as err:
            parser.error(f"argument --adapters: they were made for another original model ({err}); give the data "
                         f"and scenario flags of the run that made them, and --checkpoint its run.json's "
                         f"original_model (the file whose SHA-256 starts with its original_sha256)")
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"argument --adapters: {err}")
        table["semu"] = {**metrics.evaluate(semu_model, loaders.forget_eval, loaders.retain_eval, loaders.test_eval),
                         "trainable_share": semu_model.report.trainable_share}
    print(results.format_table(table))
    if args.json is not None:
        results.write_json(args.json, {"scenario": scenario, "metrics": table})
    return 0


def run_report(args, parser) -> int:
    from ..workflows import results

    if args.folder.exists() and not args.folder.is_dir():
        parser.error(f"argument folder: {args.folder} is not a folder (give the run's --out folder)")
    try:
        files = results.render(args.folder)
    except (FileNotFoundError, ValueError) as err:
        library_error(parser, err)
    if (args.folder / results.SAMPLES).is_file():  # a diffusion run: its report.md holds the numbers
        return finish_run(args.folder, files, [])
    return finish_run(args.folder, files, [results.format_table(results.read_json(args.folder / "metrics.json"))])


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
                   help="the trained model: a state dict or a SalUn checkpoint (.pth.tar with 'state_dict'); on digits "
                   "the train/test split is drawn from --seed, so give the seed it was trained with")
    g.add_argument("--train-epochs", type=positive(int), default=None,
                   help="train the original (and Retrain) here for this many epochs when there is no checkpoint")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where models trained here are cached (default $SEMU_FAST_CACHE or ~/.cache/semu_fast)")
    add_device_flag(g)
    g = p.add_argument_group("scenario (as SalUn)")
    g.add_argument("--forget-class", type=int, default=None, metavar="C",
                   help="class-wise forgetting of class C (default 0 unless --num-forget is given alone)")
    g.add_argument("--num-forget", type=positive(int), default=None, metavar="N",
                   help="forget N random samples (of class C when --forget-class is given too)")
    return p


def register(sub) -> None:
    """Add `unlearn`, `eval` and `report` to an argparse subparsers object."""
    data = _data_flags()
    un = sub.add_parser("unlearn", parents=[data], help="forget with SEMU next to the baselines, write a report "
                        "(default: the bundled digits)")
    g = un.add_argument_group("SEMU and baselines")
    add_preset_flag(g, "sf.preset('official-classification'): SGD lr 1e-5 x 10 epochs, its projection, rank and "
                    "label rules, early exit; SalUn's 90%% split and augmentation")
    g.add_argument("--retain-fraction", type=fraction, default=0.0, metavar="F",
                   help="share of the retain set unlearning may use (0 = data-free, the default)")
    g.add_argument("--stop-at-test-accuracy", action=argparse.BooleanOptionalAction, default=None,
                   help="SEMU stops once the forget accuracy falls to the original's test accuracy, where Retrain "
                   "leaves forgotten random samples (default: on with --num-forget, off for class-wise forgetting "
                   "and the official preset)")
    add_training_flags(g, gamma_default=0.95, lr=5e-3, epochs=15, optimizer="adam")
    g.add_argument("--baselines", type=_methods, default=("ft", "ga", "rl"),
                   help="comma-separated among ft, ga, rl, or 'none' (default ft,ga,rl)")
    g.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=None,
                   help="train a Retrain model (retain data only) for the table and Avg. Gap; default on for digits")
    g.add_argument("--retrain-checkpoint", type=Path, default=None, help="a trained Retrain model to compare with")
    add_run_flags(un.add_argument_group("run"), "semu_fast_out",
                  "metrics.json, run.json, report.md, plots and adapters/")
    un.set_defaults(func=run_unlearn, parser=un, seed=None)  # None: 0, or SalUn's 2 with --preset official

    ev = sub.add_parser("eval", parents=[data], help="SalUn's metrics of the original model (and of saved SEMU "
                        "adapters on it)")
    ev.add_argument("--adapters", type=Path, default=None, help="a folder written by save_adapters")
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    ev.add_argument("--seed", type=seed, default=0, help="seeds the split and the models trained here (use the one "
                    "the adapters were made with)")
    ev.add_argument("--preset", choices=("ours", "official"), default=None,
                    help="the split: official draws SalUn's, as unlearn --preset official (default: that of the run "
                    "whose folder holds --adapters, else ours)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    ev.set_defaults(func=run_eval, parser=ev)

    rep = sub.add_parser("report", help="rebuild report.md and the plots of a results folder")
    rep.add_argument("folder", type=Path, help="a folder written by semu-fast unlearn, unlearn-ddpm or unlearn-sd")
    rep.set_defaults(func=run_report, parser=rep)
