"""Named presets: the settings of the official SEMU runs (github gmum/semu, commit 2c4c3f8), as keyword arguments.

    semu_model, report = sf.unlearn(model, forget_loader, retain_loader, **sf.preset("official-classification"))
    kwargs = sf.preset("official-classification", gamma=0.9, retain_mode="mixed")   # depart knowingly

A preset reproduces the official run, its quirks included (the projection that divides by ||W||, the rank rule's
off-by-one, the label rule that favours class y + 1): our defaults are what forgets best, the preset is what the
paper ran. Overrides name SEMUConfig fields or the target function's parameters; anything else is an error. The
README's "Official runs" table lists every setting next to our default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import SEMUConfig


@dataclass(frozen=True)
class Preset:
    """target: the function the keyword arguments are for; config: SEMUConfig fields; kwargs: the target's other
    parameters; accepts: every parameter name of the target an override may set (checked against the function's
    signature by the tests); source: where the official code sets each value."""

    target: str
    config: dict
    kwargs: dict
    accepts: tuple
    source: str


_UNLEARN_PARAMETERS = ("loss_fn", "train_loss_fn", "retain_loss_fn", "optimizer", "lr", "epochs", "momentum",
                       "weight_decay", "select_best", "patience", "min_delta", "label_rule", "retain_mode",
                       "grad_clip", "progress", "on_epoch", "checkpoint_dir", "checkpoint_every", "resume", "distributed",
                       "process_group")

PRESETS = {
    # Classification/main_forget.py --unlearn own_SVD, with the README's example flags (ResNet-18, CIFAR).
    "official-classification": Preset(
        target="semu_fast.unlearn",
        config={"gamma": 0.95, "projection": "official", "rank_rule": "official", "conv_rank": "max",
                "svd": "exact", "norm_mode": "train", "train_norm_mode": "eval"},
        kwargs={"optimizer": "sgd", "lr": 1e-5, "epochs": 10, "momentum": 0.9, "weight_decay": 5e-4,
                "label_rule": "official", "retain_mode": "score", "select_best": False, "patience": 2,
                "min_delta": 0.01},
        accepts=_UNLEARN_PARAMETERS,
        source="Classification/README.md (example run), arg_parser.py (momentum, weight decay, batch 256), "
               "unlearn/own_SVD.py (labels, train_phase), unlearn/own/impl.py (SGD, EarlyExit), "
               "unlearn/own/transform_model.py (model.train() gradient pass)"),
}


def preset(name: str, **overrides) -> dict:
    """Keyword arguments for the preset's target function (PRESETS[name].target), `config` a SEMUConfig; each
    override replaces one setting (a SEMUConfig field or a parameter of the target)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    chosen = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(SEMUConfig)}
    unknown = sorted(k for k in overrides if k not in fields and k not in chosen.accepts)
    if unknown:
        raise ValueError(f"preset {name!r}: {', '.join(unknown)} is neither a SEMUConfig field nor a parameter of "
                         f"{chosen.target}")
    config = {**chosen.config, **{k: v for k, v in overrides.items() if k in fields}}
    kwargs = {**chosen.kwargs, **{k: v for k, v in overrides.items() if k not in fields}}
    return {"config": SEMUConfig(**config), **kwargs}
