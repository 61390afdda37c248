"""The unlearning baselines SEMU is compared with, as SalUn defines them, all on the full model:
FT (fine-tune on retain data), GA (gradient ascent on the forget set), RL (random labels on the forget set, true
labels on retain data) and Retrain (a fresh model trained on retain data only: the gold standard).

Each runs in place on the model it is given and returns the per-epoch history; `fit` is the plain supervised loop
that also trains the original models of the built-in tasks."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..losses import ascent_loss, random_label_loss, true_label_loss
from ..training import check_training_args, interleave

# Adam settings that unlearn the bundled digits task without wrecking it (see README's table); override per run.
DEFAULTS = {"ft": {"lr": 3e-3, "epochs": 10}, "ga": {"lr": 1e-3, "epochs": 8}, "rl": {"lr": 1e-3, "epochs": 5}}
EpochHook = Optional[Callable[[int, nn.Module], Optional[dict]]]


def _run(model: nn.Module, forget: Optional[Iterable], retain: Optional[Iterable], forget_loss, epochs: int,
         lr: float, seed: int, on_epoch: EpochHook, progress: bool, desc: str) -> list[dict]:
    check_training_args("adam", lr, epochs, 0.0, 0.0)
    torch.manual_seed(seed)  # dropout and any other global randomness of the model
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress):
        model.train()
        losses = []
        stream = interleave(forget, retain) if forget is not None else (("retain", b) for b in retain)
        for kind, batch in stream:
            loss = (forget_loss if kind == "forget" else true_label_loss)(model, batch, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        entry = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)}
        entry.update((on_epoch(epoch + 1, model) or {}) if on_epoch is not None else {})
        history.append(entry)
    return history


def fit(model: nn.Module, loader: Iterable, epochs: int, lr: float, seed: int = 0, on_epoch: EpochHook = None,
        progress: bool = False, desc: str = "train") -> list[dict]:
    """Cross-entropy training of every parameter with Adam; leaves the model in eval mode."""
    return _run(model, None, loader, None, epochs, lr, seed, on_epoch, progress, desc)


def _need(loader, method: str, what: str):
    if loader is None:
        raise ValueError(f"{method} needs {what}: pass a retain loader (a retain fraction above 0)")
    return loader


def finetune(model, forget_loader, retain_loader, *, epochs, lr, seed=0, on_epoch=None, progress=False):
    """FT: fine-tune on the retain data only (catastrophic forgetting of the forget set)."""
    return fit(model, _need(retain_loader, "FT", "retain data"), epochs, lr, seed, on_epoch, progress, "FT")


def gradient_ascent(model, forget_loader, retain_loader, *, epochs, lr, seed=0, on_epoch=None, progress=False):
    """GA: maximise the cross-entropy of the forget set (retain data unused)."""
    return _run(model, forget_loader, None, ascent_loss, epochs, lr, seed, on_epoch, progress, "GA")


def random_labels(model, forget_loader, retain_loader, *, epochs, lr, seed=0, on_epoch=None, progress=False):
    """RL: cross-entropy against random wrong labels on the forget set, true labels on retain data when given."""
    return _run(model, forget_loader, retain_loader, random_label_loss, epochs, lr, seed, on_epoch, progress, "RL")


METHODS = {"ft": finetune, "ga": gradient_ascent, "rl": random_labels}
