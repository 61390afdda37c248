"""The classification losses of SEMU: true-label cross-entropy (the gradient pass, and retain batches while R
trains) and the random-label loss R is trained with (SalUn's RL). Signatures: loss_fn(model, batch) -> scalar for
the gradient pass; train_loss_fn(model, batch, generator) -> scalar while training R.

Random labels follow one of LABEL_RULES: "uniform_other" (uniform over the C - 1 classes != the true one, SalUn's
intent and our default) or "official" (r uniform over all C classes, and r == y replaced by (r + 1) mod C, as the
official SEMU code draws them: class y + 1 is then twice as likely as any other)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice
from ._utils import model_device, split_batch


def _cross_entropy(model: nn.Module, batch, what: str) -> torch.Tensor:
    inputs, targets = split_batch(batch, what)
    device = model_device(model)
    return F.cross_entropy(model(inputs.to(device)), targets.to(device))


def cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    """The default SEMU gradient loss for classifiers: cross-entropy with the true labels."""
    return _cross_entropy(model, batch, "loss_fn=None")


def true_label_loss(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy with the true labels, in the training-loss signature (retain batches)."""
    return _cross_entropy(model, batch, "the retain loss")


def ascent_loss(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """-cross-entropy with the true labels: gradient ascent on the forget set (the GA baseline)."""
    return -true_label_loss(model, batch, generator)


LABEL_RULES = ("uniform_other", "official")


def random_labels(targets: torch.Tensor, num_classes: int, generator: torch.Generator,
                  rule: str = "uniform_other") -> torch.Tensor:
    """A random label != target for each target (on the CPU, from `generator`), drawn by `rule` (LABEL_RULES)."""
    check_choice("label_rule", rule, LABEL_RULES)
    if num_classes < 2:
        raise ValueError(f"random labels need at least 2 classes, the model outputs {num_classes}")
    targets = targets.cpu()
    if rule == "uniform_other":
        drawn = (targets + torch.randint(1, num_classes, targets.shape, generator=generator)) % num_classes
        outside = (targets < 0) | (targets >= num_classes)  # drawing among fewer classes (label_classes): every
        if outside.any():  # one is "other" for these, the shift above would never give target % num_classes
            drawn = torch.where(outside, torch.randint(0, num_classes, targets.shape, generator=generator), drawn)
        return drawn
    drawn = torch.randint(0, num_classes, targets.shape, generator=generator)
    return torch.where(drawn == targets, (drawn + 1) % num_classes, drawn)


def _label_classes(logits: torch.Tensor, label_classes: Optional[int]) -> int:
    """How many classes random labels are drawn from: the first label_classes of the model's outputs (all of them
    when None or fewer)."""
    return logits.shape[-1] if label_classes is None else min(label_classes, logits.shape[-1])


def random_label_loss(model: nn.Module, batch, generator: torch.Generator, rule: str = "uniform_other",
                      label_classes: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy against a random label that differs from the true one (SalUn's RL, as SEMU trains), drawn by
    `rule` (see LABEL_RULES) from the first `label_classes` classes (None: every output; the official code draws
    from its --num_classes, 10 unless given, also for CIFAR-100)."""
    inputs, targets = split_batch(batch, "the random-label loss")
    device = model_device(model)
    logits = model(inputs.to(device))
    labels = random_labels(targets, _label_classes(logits, label_classes), generator, rule)
    return F.cross_entropy(logits, labels.to(device))


def random_label_loss_for(rule: str, label_classes: Optional[int] = None):
    """random_label_loss drawing by `rule` from `label_classes` classes, in the training-loss signature."""
    if rule == "uniform_other" and label_classes is None:
        return random_label_loss
    return functools.partial(random_label_loss, rule=rule, label_classes=label_classes)


def mixed_batch_loss(model: nn.Module, batch, generator: torch.Generator, rule: str = "official",
                     label_classes: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy on a mixed batch (inputs, targets, is_forget): forget samples against random labels drawn by
    `rule` from `label_classes` classes, retain samples against their true labels (the official retain variant's
    shuffled union)."""
    inputs, targets, is_forget = batch
    device = model_device(model)
    logits = model(inputs.to(device))
    drawn = random_labels(targets, _label_classes(logits, label_classes), generator, rule)
    labels = torch.where(is_forget.cpu().bool(), drawn, targets.cpu())
    return F.cross_entropy(logits, labels.to(device))
