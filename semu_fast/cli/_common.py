"""What every `semu-fast` command shares: argument types that name what was expected, the shared flag groups
(output, seed and quietness; device), the check for optional packages, the default cache folder, and the end of a
run (what was written, where)."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Optional

from .._checks import check_gamma


def gamma(text: str) -> float:
    try:
        return check_gamma("gamma", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}") from None


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def positive(kind):
    """An argparse type: `kind(text)` that must be finite and > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value == float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
        return value
    return parse


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**63), got {text}")
    return value


def device(text: str) -> str:
    """A torch device that exists here ("cpu", "cuda", "cuda:1"); "auto" (the default) is CUDA when there is one."""
    import torch

    from .._utils import default_device

    if text == "auto":  # argparse converts the default when --device is not given: torch is imported only then
        return default_device()
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return text


def out_folder(text: str) -> Path:
    """A folder to write into: it may exist, but not as a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def add_run_flags(group, default_out: str, what: str) -> None:
    """--out, --seed and --quiet."""
    group.add_argument("--out", type=out_folder, default=Path(default_out),
                       help=f"folder for {what} (default ./{default_out})")
    group.add_argument("--seed", type=seed, default=0, help="seeds the data order, SEMU and everything random")
    group.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def add_training_flags(group, *, gamma_default: float, lr: float, epochs=None, optimizer=None, what: str = "",
                       epochs_help: str = "passes over the forget set") -> None:
    """--gamma, --lr and, when given defaults, --epochs and --optimizer: the SEMU settings every command takes."""
    group.add_argument("--gamma", type=gamma, default=gamma_default,
                       help=f"explained-variance threshold in (0, 1] (default {gamma_default:g})")
    if optimizer is not None:
        group.add_argument("--optimizer", choices=("adam", "sgd"), default=optimizer)
    group.add_argument("--lr", type=positive(float), default=lr, help=f"learning rate for R (default {lr:g}{what})")
    if epochs is not None:
        group.add_argument("--epochs", type=positive(int), default=epochs, help=f"{epochs_help} (default {epochs})")


def add_preset_flag(group, official: str, moved: Optional[dict] = None) -> None:
    """--preset ours|official; `official` says what the official run sets. moved: {old value: the flag that takes it
    now}, for values --preset used to take, refused with that pointer."""

    def preset(value: str) -> str:
        if moved and value in moved:
            raise argparse.ArgumentTypeError(f"--preset takes ours or official; {value!r} is a value of "
                                             f"{moved[value]} now ({moved[value]} {value})")
        return value

    group.add_argument("--preset", type=preset, choices=("ours", "official"), default="ours",
                       help=f"official: the official SEMU run ({official}; flags given override "
                       f"it); ours (default): the settings that forget best here")


def preset_options(name: str, args, flags: dict, dests: Optional[dict] = None, **fixed) -> dict:
    """sf.preset(name) with `fixed` and every flag of `flags` ({parameter: value}) given on the command line, also
    with its default value (args.given: the dests given, which semu_fast.cli.main records); dests maps a parameter
    to its flag's dest where the two names differ."""
    import semu_fast as sf

    dests = dests or {}
    return sf.preset(name, **fixed, **{k: v for k, v in flags.items() if dests.get(k, k) in args.given})


def add_device_flag(group) -> None:
    group.add_argument("--device", type=device, default="auto", help="e.g. cuda or cpu (default auto: cuda when "
                       "available)")


def library_error(parser, err: Exception) -> None:
    """parser.error for an error the library raised: when it says what a parameter that is also a flag of this
    command must be ("num_forget must be ..."), it is named as the flag ("argument --num-forget: must be ..."), as
    argparse's own errors are; any other message is left as it is."""
    text = str(err)
    match = re.match(r"([a-z][a-z0-9_]*) (must .*)", text, re.S)
    if match and "--" + match[1].replace("_", "-") in parser._option_string_actions:
        text = f"argument --{match[1].replace('_', '-')}: {match[2]}"
    parser.error(text)


PIP_NAMES = {"rouge_score": "rouge-score", "sklearn": "scikit-learn"}  # where the module's name is not pip's


def require(parser, *modules: str, what: str = "this command") -> None:
    """Exit with a clear message when an optional package `what` needs is missing (before any work)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            parser.error(f"{what} needs the {module} package: pip install {PIP_NAMES.get(module, module)}")


def silence(*libraries: str) -> None:
    """Errors only and no progress bars from the Hugging Face libraries a quiet command uses ("transformers",
    "diffusers"); one that is not installed is skipped. (semu_fast's own logging follows --quiet in cli.main.)"""
    for name in libraries:
        try:
            hf_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def settings(args, options: Optional[dict] = None, flags: Optional[dict] = None,
             dests: Optional[dict] = None) -> dict:
    """The parsed flags, JSON-ready (paths as strings), without those whose value the run did not use: a flag of
    `flags` ({parameter: value}, dests as in preset_options) whose parameter the run's `options` set otherwise (a
    preset's value; the run's semu_settings record what it used)."""
    dests = dests or {}
    unused = {dests.get(k, k) for k, v in (flags or {}).items() if options is not None and options.get(k, v) != v}
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
            if key not in ("func", "quiet", "command", "parser", "given", *unused)}


def named_paths(args) -> list:
    """Every path the command line named but --out (the model, data, checkpoints, caches): a run never removes
    them from its --out folder (results.record_run)."""
    values = [v for key, value in vars(args).items() if key != "out"
              for v in (value if isinstance(value, (list, tuple)) else [value])]
    return [v for v in values if isinstance(v, Path)]


def finish_run(out: Path, files: list, summary=()) -> int:
    """Print the run's summary lines and what was written where; the command's exit status (0)."""
    for line in summary:
        print(line)
    print(f"wrote {', '.join(files)} to {out}")
    return 0
