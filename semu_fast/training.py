"""sf.unlearn: prepare SEMU adapters, then train only R (random-label loss on the forget set by default)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import SEMUConfig
from .gradients import LossFn, model_device, set_norm_mode, split_batch
from .model import SEMUModel
from .pipeline import prepare
from .report import SEMUReport

OPTIMIZERS = ("sgd", "adam")
TrainLossFn = Callable[[nn.Module, object, torch.Generator], torch.Tensor]


def random_label_loss(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy against a random label that differs from the true one (SalUn's RL, as SEMU trains)."""
    inputs, targets = split_batch(batch, "the random-label loss")
    device = model_device(model)
    logits = model(inputs.to(device))
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"random labels need at least 2 classes, the model outputs {num_classes}")
    shift = torch.randint(1, num_classes, targets.shape, generator=generator)
    random_targets = (targets.cpu() + shift) % num_classes  # uniform over the classes != target
    return F.cross_entropy(logits, random_targets.to(device))


def true_label_loss(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    inputs, targets = split_batch(batch, "the retain loss")
    device = model_device(model)
    return F.cross_entropy(model(inputs.to(device)), targets.to(device))


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in percent over (inputs, targets) batches, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = total = 0
    try:
        for batch in loader:
            inputs, targets = split_batch(batch, "accuracy")
            correct += (model(inputs.to(device)).argmax(-1) == targets.to(device)).sum().item()
            total += targets.numel()
    finally:
        model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _interleave(forget: Iterable, retain: Optional[Iterable]):
    """("forget", batch) and ("retain", batch) alternately until both loaders are exhausted."""
    streams = [(("forget", b) for b in forget)]
    if retain is not None:
        streams.append((("retain", b) for b in retain))
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


def _check_training_args(optimizer, lr, epochs, momentum, weight_decay):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, None), ("weight_decay", weight_decay, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (low is not None and value <= low):
            raise ValueError(f"{name} must be a {'positive' if low is not None else 'non-negative'} number, got {value!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")


def unlearn(model: nn.Module, forget_loader: Iterable, retain_loader: Optional[Iterable] = None,
            config: Optional[SEMUConfig] = None, *, loss_fn: Optional[LossFn] = None,
            train_loss_fn: Optional[TrainLossFn] = None, optimizer: str = "sgd", lr: float = 1e-5,
            epochs: int = 10, momentum: float = 0.9, weight_decay: float = 5e-4, select_best: bool = True,
            patience: Optional[int] = None, progress: bool = True) -> tuple[SEMUModel, SEMUReport]:
    """SEMU end to end: sf.prepare, then train R for `epochs` passes over the forget set (and the retain set,
    interleaved, when given). Returns (SEMUModel, report).

    loss_fn: the gradient-pass loss (see prepare). train_loss_fn(model, batch, generator) -> scalar: the forget
    loss while training R; None means cross-entropy against random labels != the true ones. Retain batches use
    cross-entropy with their true labels. optimizer "sgd" (with momentum, weight_decay) or "adam".
    select_best (classification only): keep the R of the epoch with the best (100 - forget acc + retain acc) / 2
    (without retain data: the lowest forget accuracy). patience: stop early once the score has not improved for
    this many epochs (classification only; None = run every epoch). progress: show a tqdm bar."""
    config = config if config is not None else SEMUConfig()
    _check_training_args(optimizer, lr, epochs, momentum, weight_decay)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {patience!r}")
    semu_model = prepare(model, forget_loader, loss_fn=loss_fn, config=config)
    report = semu_model.report
    params = semu_model.trainable_parameters()
    if not params:
        report.training = {"note": "no adapter installed (all forget gradients are zero): nothing to train"}
        return semu_model, report
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    forget_loss = train_loss_fn or random_label_loss
    classify = train_loss_fn is None
    history, best_score, best_state, best_epoch = [], None, None, None

    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="SEMU unlearn", disable=not progress)
    for epoch in bar:
        set_norm_mode(semu_model, config.norm_mode)
        losses = []
        for kind, batch in _interleave(forget_loader, retain_loader):
            loss = (forget_loss if kind == "forget" else true_label_loss)(semu_model, batch, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)}
        if classify:
            entry["forget_acc"] = accuracy(semu_model, forget_loader)
            if retain_loader is not None:
                entry["retain_acc"] = accuracy(semu_model, retain_loader)
            retain = entry.get("retain_acc")
            entry["score"] = (100.0 - entry["forget_acc"] + retain) / 2 if retain is not None \
                else 100.0 - entry["forget_acc"]
            if best_score is None or entry["score"] > best_score:
                best_score, best_epoch = entry["score"], epoch + 1
                if select_best:
                    best_state = [p.detach().clone() for p in params]
        history.append(entry)
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch"})
        if patience is not None and best_epoch is not None and epoch + 1 - best_epoch >= patience:
            break
    if best_state is not None:
        with torch.no_grad():
            for param, saved in zip(params, best_state):
                param.copy_(saved)
    semu_model.eval()
    report.timings["train"] = time.perf_counter() - start
    report.training = {"history": history, "best_epoch": best_epoch if select_best else None,
                       "optimizer": optimizer, "lr": lr, "epochs": len(history)}
    return semu_model, report
