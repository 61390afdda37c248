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

from . import distributed as distributed_setup
from .checkpoint import Checkpoint
from .config import SEMUConfig
from .gradients import LossFn, model_device, set_norm_mode, split_batch
from .io import load_adapters
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
def accuracy(model: nn.Module, loader: Iterable, group: Optional[distributed_setup.Group] = None) -> float:
    """Top-1 accuracy in percent over (inputs, targets) batches, in eval mode (the mode is restored); with a
    distributed group, over the union of every rank's loader."""
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
    if group is not None:
        counts = torch.tensor([float(correct), float(total)], device=device)
        distributed_setup.all_reduce_sum_([counts], group)
        correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


def _interleave(forget: Iterable, retain: Optional[Iterable]):
    """("forget", batch) and ("retain", batch) alternately until both loaders are exhausted."""
    streams = [(("forget", b) for b in forget)]
    if retain is not None:
        streams.append((("retain", b) for b in retain))
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


def _average_gradients(params: list[torch.Tensor], group: distributed_setup.Group) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    distributed_setup.all_reduce_sum_(grads, group)
    for g in grads:
        g.div_(group.size)


def check_training_args(optimizer, lr, epochs, momentum, weight_decay):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, None), ("weight_decay", weight_decay, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (low is not None and value <= low):
            raise ValueError(f"{name} must be a {'positive' if low is not None else 'non-negative'} number, got {value!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")


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
    signature, for retain batches; None means cross-entropy with their true labels. optimizer "sgd" (with momentum, weight_decay) or "adam".
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
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {patience!r}")
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
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    forget_loss = train_loss_fn or random_label_loss
    retain_loss = retain_loss_fn or true_label_loss
    classify = train_loss_fn is None
    run = {"epoch": 0, "step": 0, "losses": [], "history": [], "best_score": None, "best_epoch": None,
           "best_state": None}
    if saved is not None:
        run = checkpoint.restore(saved, semu_model, opt, generator)

    start = time.perf_counter()
    bar = tqdm(range(run["epoch"], epochs), desc="SEMU unlearn", disable=not progress)
    for epoch in bar:
        set_norm_mode(semu_model, config.norm_mode)
        for step, (kind, batch) in enumerate(_interleave(forget_loader, retain_loader)):
            if step < run["step"]:  # done before the checkpoint this run resumes from
                continue
            loss = (forget_loss if kind == "forget" else retain_loss)(semu_model, batch, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if group is not None:
                _average_gradients(params, group)
            opt.step()
            run["losses"].append(loss.item())
            run["step"] = step + 1
            if checkpoint.due(run["step"]):
                checkpoint.save(run, semu_model, opt, generator, group)
        entry = {"epoch": epoch + 1, "loss": sum(run["losses"]) / max(len(run["losses"]), 1)}
        if classify:
            entry["forget_acc"] = accuracy(semu_model, forget_loader, group)
            if retain_loader is not None:
                entry["retain_acc"] = accuracy(semu_model, retain_loader, group)
            retain = entry.get("retain_acc")
            entry["score"] = (100.0 - entry["forget_acc"] + retain) / 2 if retain is not None \
                else 100.0 - entry["forget_acc"]
            if run["best_score"] is None or entry["score"] > run["best_score"]:
                run["best_score"], run["best_epoch"] = entry["score"], epoch + 1
                if select_best:
                    run["best_state"] = [p.detach().clone() for p in params]
        if on_epoch is not None:
            entry.update(on_epoch(epoch + 1, semu_model) or {})
        run["history"].append(entry)
        run.update(epoch=epoch + 1, step=0, losses=[])
        if checkpoint.enabled:
            checkpoint.save(run, semu_model, opt, generator, group)
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch"})
        if patience is not None and run["best_epoch"] is not None and epoch + 1 - run["best_epoch"] >= patience:
            break
    history, best_state, best_epoch = run["history"], run["best_state"], run["best_epoch"]
    if best_state is not None:
        with torch.no_grad():
            for param, saved in zip(params, best_state):
                param.copy_(saved)
    semu_model.eval()
    report.timings["train"] = time.perf_counter() - start
    report.training = {"history": history, "best_epoch": best_epoch if select_best else None,
                       "optimizer": optimizer, "lr": lr, "epochs": len(history)}
    return semu_model, report
