"""What every `semu-fast` subcommand shares: argument types that name what was expected, the default cache
folder, and the JSON pieces each command writes (its settings and the per-layer ranks)."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def gamma(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive(kind):
    """An argparse type: `kind(text)` that must be > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def default_cache() -> Path:
    return Path(os.environ.get("SEMU_FAST_CACHE", Path.home() / ".cache" / "semu_fast"))


def silence(*libraries: str) -> None:
    """Errors only and no progress bars from the Hugging Face libraries a quiet command uses ("transformers",
    "diffusers"); one that is not installed is skipped. (semu_fast's own logging follows --quiet in cli.main.)"""
    import importlib

    for name in libraries:
        try:
            hf_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def settings(args) -> dict:
    """The parsed flags, JSON-ready (paths as strings)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
            if key not in ("func", "quiet", "command")}


def layers(report) -> list:
    """One object per adapted layer: its shape, rank k, gamma and captured variance."""
    return [{"name": layer.name, "shape": list(layer.shape), "k": layer.k, "gamma": layer.gamma,
             "captured_variance": layer.captured_variance, "trainable_params": layer.trainable_params}
            for layer in report.layers]


def _finite(value):
    """Strict JSON has no Infinity or NaN (a perplexity may overflow): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, payload) -> None:
    from .io import atomic_write

    text = json.dumps(_finite(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_run(out: Path, semu_model, report, metrics: dict, run_settings: dict) -> list:
    """out/adapters (sf.load_adapters) and out/metrics.json (settings, metrics, per-layer ranks, training history,
    timings); returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    semu_model.save_adapters(out / "adapters")
    write_json(out / "metrics.json", {"settings": run_settings, "metrics": metrics, "layers": layers(report),
                                      "training": report.training, "timings": report.timings})
    return ["metrics.json", "adapters/"]
