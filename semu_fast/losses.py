"""The classification losses of SEMU: true-label cross-entropy (the gradient pass, and retain batches while R
trains) and the random-label loss R is trained with (SalUn's RL). Signatures: loss_fn(model, batch) -> scalar for
the gradient pass; train_loss_fn(model, batch, generator) -> scalar while training R."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
