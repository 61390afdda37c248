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

from ._checks import check_choice
from .config import SEMUConfig


@dataclass(frozen=True)
class Preset:
    """target: the function the keyword arguments are for; config: SEMUConfig fields, passed as a SEMUConfig under
    config_key "config" or as a dict of fields under another key (a workflow that builds its own config from
    them); kwargs: the target's other parameters; accepts: every parameter name of the target an override may set
    (checked against the function's signature by the tests); source: where the official code sets each value."""

    target: str
    config: dict
    kwargs: dict
    accepts: tuple
    source: str
    config_key: str = "config"


_UNLEARN_PARAMETERS = ("loss_fn", "train_loss_fn", "retain_loss_fn", "optimizer", "lr", "epochs", "momentum",
                       "weight_decay", "select_best", "patience", "min_delta", "label_rule", "label_classes",
                       "retain_mode", "max_grad_norm", "max_steps", "progress", "on_epoch", "checkpoint_dir",
                       "checkpoint_every", "resume", "distributed", "process_group")

PRESETS = {
    # Classification/main_forget.py --unlearn own_SVD, with the README's example flags (ResNet-18, CIFAR).
    "official-classification": Preset(
        target="semu_fast.unlearn",
        config={"gamma": 0.95, "projection": "official", "rank_rule": "official", "conv_rank": "max",
                "svd": "exact", "norm_mode": "train", "train_norm_mode": "eval_all"},
        kwargs={"optimizer": "sgd", "lr": 1e-5, "epochs": 10, "momentum": 0.9, "weight_decay": 5e-4,
                "label_rule": "official", "label_classes": 10, "retain_mode": "score", "select_best": False,
                "patience": 2, "min_delta": 0.01},
        accepts=_UNLEARN_PARAMETERS,
        source="Classification/README.md (example run), arg_parser.py (momentum, weight decay, batch 256), "
               "unlearn/own_SVD.py (labels, from --num_classes: 10 unless given, train_phase), "
               "unlearn/own/impl.py (SGD, EarlyExit), unlearn/own/transform_model.py (model.train() gradient pass)"),
    # DDPM/train.py --mode generate_svd then --mode semu_unlearn --method rl, with the README's flags and
    # configs/cifar10_semu_unlearn.yml (batch 64 is the forget loader's). That mode trains on the forget loss alone
    # (it ignores --alpha): alpha 0. Its retain variant, --mode semu_unlearn_retrain, adds 1e-3 x the remain loss.
    "official-ddpm": Preset(
        target="semu_fast.workflows.diffusion.unlearn_ddpm",
        config={"projection": "official", "rank_rule": "official", "min_rank": 0, "svd": "exact",
                "grad_clip": 1.0, "norm_mode": "eval_all"},
        kwargs={"gamma": 0.95, "attention_gamma": 1.0, "attention_layout": "per_column", "lr": 1e-3, "steps": 1000,
                "alpha": 0.0, "guidance": 2.0, "target": "next", "cond_dropout": 0.1, "reduction": "sum",
                "max_grad_norm": 1.0},
        accepts=("num_classes", "alpha", "gamma", "attention_gamma", "attention_layout", "lr", "steps", "epochs",
                 "seed", "progress", "antithetic", "guidance", "target", "cond_dropout", "reduction",
                 # sf.unlearn's, through unlearn_ddpm's **unlearn_kwargs (not those it sets itself)
                 "max_grad_norm", "patience", "on_epoch", "checkpoint_dir", "checkpoint_every", "resume",
                 "distributed", "process_group"),
        source="DDPM/README.md (flags), train.py (cond_scale 2, alpha for semu_unlearn_retrain only), "
               "configs/cifar10_semu_unlearn.yml (Adam 1e-3, 1000 iterations, batch 64, grad_clip 1, "
               "cond_drop_prob 0.1), runners/diffusion.py generate_svd and "
               "svd unlearning, svd_utils/transform_model.py (no rank floor, per-channel ranks, attention gamma)",
        config_key="semu_options"),
    # SD/train-scripts/svd_unlearning_diffusers.py (which runs generate_svd_diffusers.generate_svd first) with its
    # argparse defaults; the SD README gives no example flags, so --use_projection_grad is taken as the
    # Classification and DDPM READMEs pass it (projection="none" is the script's default without the flag).
    "official-sd": Preset(
        target="semu_fast.workflows.stable_diffusion.unlearn_sd",
        config={"projection": "official", "rank_rule": "official", "min_rank": 0, "svd": "exact",
                "norm_mode": "eval_all"},
        kwargs={"preset": "all", "gamma": 0.95, "attention_gamma": None, "gradient_guidance": 7.5, "lr": 1e-5,
                "epochs": 5, "batch_size": 8, "shuffle": False},
        accepts=("preset", "gamma", "attention_gamma", "gradient_guidance", "lr", "epochs", "batch_size", "shuffle",
                 "seed", "progress", "num_latents", "sample_steps", "sample_guidance", "retain_weight",
                 "max_grad_norm", "max_steps", "patience", "on_epoch", "checkpoint_dir", "checkpoint_every",
                 "resume", "distributed", "process_group"),
        source="SD/train-scripts/svd_unlearning_diffusers.py (Adam, lr 1e-5, batch 8, 5 epochs of len(loader) "
               "steps, c_guidance 7.5, gamma 0.95 for attention too, --retrain alpha 0.1, pseudo prompt (c + 1) "
               "mod 10), generate_svd_diffusers.py (guided gradient pass in eval mode, summed over the unshuffled "
               "forget loader), svd_utils_diffusers/transform_model.py (projection dividing by ||W||, "
               "torch.linalg.svd, searchsorted rank without a floor, per-channel conv ranks, clip_grad masks only), "
               "svd_utils_diffusers/utils.py (every Linear and Conv2d adapted), dataset.py (forget loader not "
               "shuffled), esd_utils.py (VAE mode x 0.18215, LMS noise = DDPM noise)",
        config_key="semu_options"),
}


def preset(name: str, **overrides) -> dict:
    """Keyword arguments for the preset's target function (PRESETS[name].target), `config` a SEMUConfig; each
    override replaces one setting (a SEMUConfig field or a parameter of the target)."""
    chosen = PRESETS[check_choice("preset", name, tuple(PRESETS))]
    fields = {f.name for f in dataclasses.fields(SEMUConfig)}
    targets = set(chosen.accepts)  # a name both take (gamma for a workflow) goes to the target
    unknown = sorted(k for k in overrides if k not in fields and k not in targets)
    if unknown:
        raise ValueError(f"preset {name!r}: {', '.join(unknown)} is neither a SEMUConfig field nor a parameter of "
                         f"{chosen.target}")
    config = {**chosen.config, **{k: v for k, v in overrides.items() if k in fields and k not in targets}}
    kwargs = {**chosen.kwargs, **{k: v for k, v in overrides.items() if k not in fields or k in targets}}
    if chosen.config_key == "config":
        return {"config": SEMUConfig(**config), **kwargs}
    SEMUConfig(**config)  # checked now, built by the target
    return {chosen.config_key: config, **kwargs}
