"""Unlearning metrics for classifiers as SalUn (Fan et al., ICLR 2024) computes them, which SEMU's paper reports.

UA = 100 - accuracy on the forget set, RA = accuracy on the retain set, TA = accuracy on the test set, and
MIA-efficacy: an RBF SVC (C=3, gamma="auto") fitted on the model's confidence in the true label for retain samples
(members, as many as there are test samples) against test samples (non-members) labels forget samples; the share
called non-members, in percent. All in percent; higher UA and MIA mean more forgetting."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from ._utils import eval_mode, model_device, split_batch

METRICS = ("UA", "RA", "TA", "MIA")


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, group: Optional[distributed.Group] = None) -> float:
    """Top-1 accuracy in percent over (inputs, targets) batches, in eval mode (the mode is restored); with a
    distributed group, over the union of every rank's loader."""
    device = model_device(model)
    correct = total = 0
    with eval_mode(model):
        for batch in loader:
            inputs, targets = split_batch(batch, "accuracy")
            correct += (model(inputs.to(device)).argmax(-1) == targets.to(device)).sum().item()
            total += targets.numel()
    if group is not None:
        counts = torch.tensor([float(correct), float(total)], device=device)
        distributed.all_reduce_sum_([counts], group)
        correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def true_label_confidence(model: nn.Module, loader: Iterable, limit: Optional[int] = None) -> np.ndarray:
    """softmax(model(x))[y] for the (x, y) batches of loader (eval mode, restored), at most `limit` samples."""
    device = model_device(model)
    out, count = [], 0
    with eval_mode(model):
        for batch in loader:
            if limit is not None and count >= limit:
                break
            inputs, targets = split_batch(batch, "the MIA confidence")
            probs = torch.softmax(model(inputs.to(device)).float(), dim=-1)
            out.append(probs.gather(1, targets.to(device).view(-1, 1)).squeeze(1).cpu())
            count += len(targets)
    conf = torch.cat(out) if out else torch.empty(0)
    return conf[:limit].double().numpy()


def svc_mia(members: np.ndarray, non_members: np.ndarray, targets: np.ndarray) -> float:
    """Share (0..1) of `targets` that an RBF SVC fitted on members (1) vs non-members (0) calls non-members."""
    from sklearn.svm import SVC

    if len(members) == 0 or len(non_members) == 0 or len(targets) == 0:
        raise ValueError(f"the MIA needs members, non-members and targets, got {len(members)}, "
                         f"{len(non_members)} and {len(targets)} samples")
    features = np.concatenate([members, non_members]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    return float(1.0 - clf.predict(targets.reshape(-1, 1)).mean())


def mia_efficacy(model: nn.Module, retain_loader: Iterable, test_loader: Iterable, forget_loader: Iterable) -> float:
    """SalUn's SVC_MIA_forget_efficacy (confidence features), in percent. The members are the first len(test)
    retain samples, as SalUn takes them: pass an unshuffled retain loader for a deterministic result."""
    non_members = true_label_confidence(model, test_loader)
    members = true_label_confidence(model, retain_loader, limit=len(non_members))
    return 100.0 * svc_mia(members, non_members, true_label_confidence(model, forget_loader))


def evaluate(model: nn.Module, forget_loader: Iterable, retain_loader: Iterable, test_loader: Iterable) -> dict:
    """{"UA", "RA", "TA", "MIA"} in percent (see the module docstring)."""
    return {"UA": 100.0 - accuracy(model, forget_loader), "RA": accuracy(model, retain_loader),
            "TA": accuracy(model, test_loader), "MIA": mia_efficacy(model, retain_loader, test_loader, forget_loader)}


def avg_gap(metrics: dict, retrain: dict) -> float:
    """SalUn's "Avg. Gap": the mean absolute difference to the Retrain model over UA, RA, TA and MIA."""
    return sum(abs(metrics[key] - retrain[key]) for key in METRICS) / len(METRICS)
