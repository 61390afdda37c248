"""sf.unlearn: prepare SEMU adapters, then train only R (random-label loss on the forget set by default)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed as distributed_setup
from .checkpoint import Checkpoint
from .config import SEMUConfig
from .gradients import LossFn, set_norm_mode
from .losses import random_label_loss, true_label_loss
from .metrics import accuracy
from .model import SEMUModel, load_adapters
from .pipeline import prepare
from .report import SEMUReport

OPTIMIZERS = ("sgd", "adam")
TrainLossFn = Callable[[nn.Module, object, torch.Generator], torch.Tensor]


def interleave(forget: Iterable, retain: Optional[Iterable]):
    """("forget", batch) and ("retain", batch) alternately until both loaders are exhausted."""
    streams = [(("forget", b) for b in forget)]
    if retain is not None:
        streams.append((("retain", b) for b in retain))
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


def check_training_args(optimizer, lr, epochs, momentum, weight_decay):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, None), ("weight_decay", weight_decay, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (low is not None and value <= low):
            raise ValueError(f"{name} must be a {'positive' if low is not None else 'non-negative'} number, got {value!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")


def _make_optimizer(params, optimizer: str, lr: float, momentum: float, weight_decay: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _average_gradients(params: list[torch.Tensor], group: distributed_setup.Group) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    distributed_setup.all_reduce_sum_(grads, group)
    for g in grads:
        g.div_(group.size)


class _Trainer:
    """One unlearn run's training state and its steps: the optimizer, the random stream, the run record that
    checkpoints save (epoch, step within it, per-step losses, history, the best R so far)."""

    def __init__(self, semu_model: SEMUModel, opt, generator, forget_loss, retain_loss, checkpoint, group):
        self.model, self.opt, self.generator = semu_model, opt, generator
        self.params = semu_model.trainable_parameters()
        self.losses = {"forget": forget_loss, "retain": retain_loss}
        self.checkpoint, self.group = checkpoint, group
        self.run = {"epoch": 0, "step": 0, "losses": [], "history": [], "best_score": None, "best_epoch": None,
                    "best_state": None}

    def train_epoch(self, forget_loader, retain_loader) -> None:
        run = self.run
        for step, (kind, batch) in enumerate(interleave(forget_loader, retain_loader)):
            if step < run["step"]:  # done before the checkpoint this run resumes from
                continue
            loss = self.losses[kind](self.model, batch, self.generator)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.group is not None:
                _average_gradients(self.params, self.group)
            self.opt.step()
            run["losses"].append(loss.item())
            run["step"] = step + 1
            if self.checkpoint.due(run["step"]):
                self.checkpoint.save(run, self.model, self.opt, self.generator, self.group)

    def score_epoch(self, epoch: int, forget_loader, retain_loader, select_best: bool) -> dict:
        """Accuracies and the score (100 - forget acc + retain acc) / 2 (without retain data: 100 - forget acc);
        keeps the best epoch's R when select_best."""
        run = self.run
        entry = {"forget_acc": accuracy(self.model, forget_loader, self.group)}
        if retain_loader is not None:
            entry["retain_acc"] = accuracy(self.model, retain_loader, self.group)
        retain = entry.get("retain_acc")
        entry["score"] = (100.0 - entry["forget_acc"] + retain) / 2 if retain is not None \
            else 100.0 - entry["forget_acc"]
        if run["best_score"] is None or entry["score"] > run["best_score"]:
            run["best_score"], run["best_epoch"] = entry["score"], epoch
            if select_best:
                run["best_state"] = [p.detach().clone() for p in self.params]
        return entry

    def end_epoch(self, entry: dict) -> None:
        run = self.run
        run["history"].append(entry)
        run.update(epoch=entry["epoch"], step=0, losses=[])
        if self.checkpoint.enabled:
            self.checkpoint.save(run, self.model, self.opt, self.generator, self.group)

    def restore_best(self) -> None:
        if self.run["best_state"] is not None:
            with torch.no_grad():
                for param, saved in zip(self.params, self.run["best_state"]):
                    param.copy_(saved)


def _check_patience(patience) -> None:
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {patience!r}")


def unlearn(model: nn.Module, forget_loader: Iterable, retain_loader: Optional[Iterable] = None,
            config: Optional[SEMUConfig] = None, *, loss_fn: Optional[LossFn] = None,
            train_loss_fn: Optional[TrainLossFn] = None, retain_loss_fn: Optional[TrainLossFn] = None,
            optimizer: str = "sgd", lr: float = 1e-5,
            epochs: int = 10, momentum: float = 0.9, weight_decay: float = 5e-4, select_best: bool = True,
            patience: Optional[int] = None, progress: bool = True, on_epoch=None, checkpoint_dir=None,
            checkpoint_every: Optional[int] = None, resume: bool = True, distributed: Optional[bool] = None,
            process_group=None) -> tuple[SEMUModel, SEMUReport]:
    """SEMU end to end: sf.prepare, then train R for `epochs` passes over the forget set (and the retain set,
    interleaved, when given). Returns (SEMUModel, report).

    loss_fn: the gradient-pass loss (see prepare). train_loss_fn(model, batch, generator) -> scalar: the forget
    loss while training R; None means cross-entropy against random labels != the true ones. retain_loss_fn, same
    signature, for retain batches; None means cross-entropy with their true labels. optimizer "sgd" (with momentum,
    weight_decay) or "adam".
    select_best (classification only): keep the R of the epoch with the best (100 - forget acc + retain acc) / 2
    (without retain data: the lowest forget accuracy). patience: stop early once the score has not improved for
    this many epochs (classification only; None = run every epoch). progress: show a tqdm bar.
    on_epoch(epoch, semu_model) -> dict or None: called after each epoch; what it returns joins that epoch's history
    entry (e.g. accuracies on data the run does not train on).

    checkpoint_dir: keep the adapters (after prepare) and the training state (R, optimizer, random stream, epoch
    and step, history, buffers) there, rewritten atomically every `checkpoint_every` steps (None: at the end of
    each epoch). With resume=True a run that finds a checkpoint there skips prepare and continues from it: with
    loaders that yield the same batches in the same order, the result equals an uninterrupted run's bit for bit.
    distributed, process_group: as in prepare; while training R the gradients of R are averaged across ranks at
    every step (every rank must yield the same number of batches) and accuracies count every rank's data."""
    config = config if config is not None else SEMUConfig()
    check_training_args(optimizer, lr, epochs, momentum, weight_decay)
    _check_patience(patience)
    checkpoint = Checkpoint(checkpoint_dir, checkpoint_every, {"optimizer": optimizer, "lr": lr,
                                                               "momentum": momentum, "weight_decay": weight_decay,
                                                               "seed": config.seed})
    group = distributed_setup.resolve(distributed, process_group)
    saved = checkpoint.load() if resume else None
    if saved is not None:
        semu_model = load_adapters(distributed_setup.unwrap(model), checkpoint.adapters_dir)
    else:
        semu_model = prepare(model, forget_loader, loss_fn=loss_fn, config=config, distributed=distributed,
                             process_group=process_group)
        checkpoint.save_adapters(semu_model, group)
    report = semu_model.report
    params = semu_model.trainable_parameters()
    if not params:
        report.training = {"note": "no adapter installed (all forget gradients are zero): nothing to train"}
        return semu_model, report
    opt = _make_optimizer(params, optimizer, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    trainer = _Trainer(semu_model, opt, generator, train_loss_fn or random_label_loss,
                       retain_loss_fn or true_label_loss, checkpoint, group)
    if saved is not None:
        trainer.run = checkpoint.restore(saved, semu_model, opt, generator)
    classify = train_loss_fn is None
    start = time.perf_counter()
    bar = tqdm(range(trainer.run["epoch"], epochs), desc="SEMU unlearn", disable=not progress)
    for epoch in bar:
        set_norm_mode(semu_model, config.norm_mode)
        trainer.train_epoch(forget_loader, retain_loader)
        losses = trainer.run["losses"]
        entry = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)}
        if classify:
            entry.update(trainer.score_epoch(epoch + 1, forget_loader, retain_loader, select_best))
        if on_epoch is not None:
            entry.update(on_epoch(epoch + 1, semu_model) or {})
        trainer.end_epoch(entry)
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch" and isinstance(v, float)})
        best = trainer.run["best_epoch"]
        if patience is not None and best is not None and epoch + 1 - best >= patience:
            break
    trainer.restore_best()
    semu_model.eval()
    report.timings["train"] = time.perf_counter() - start
    report.training = {"history": trainer.run["history"], "best_epoch": trainer.run["best_epoch"] if select_best
                       else None, "optimizer": optimizer, "lr": lr, "epochs": len(trainer.run["history"])}
    return semu_model, report
