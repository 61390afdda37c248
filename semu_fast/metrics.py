"""Unlearning metrics for classifiers as SalUn (Fan et al., ICLR 2024) computes them, which SEMU's paper reports.

UA = 100 - accuracy on the forget set, RA = accuracy on the retain set, TA = accuracy on the test set, and
MIA-efficacy: an RBF SVC (C=3, gamma="auto") fitted on a feature of the model's softmax for retain samples
(members, as many as there are test samples) against test samples (non-members) labels forget samples; the share
called non-members, in percent. All in percent; higher UA and MIA mean more forgetting.

SalUn computes the MIA on five features (`MIA_FEATURES`); "confidence" (the true label's probability) is the one
papers report, as "MIA" here; the others are MIA_correctness (argmax == label, 0/1), MIA_entropy (of the softmax),
MIA_m_entropy and MIA_prob (the whole softmax vector). m_entropy follows SalUn's code, which differs from the
modified entropy of Song & Mittal (2021): the columns of every label present in the split get (1 - p) log p, the
other columns p log p (its "reverse" log-probability is log p), so the numbers compare with published ones."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from ._utils import eval_mode, model_device, split_batch

METRICS = ("UA", "RA", "TA", "MIA")
MIA_FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, group: Optional[distributed.Group] = None) -> float:
    """Top-1 accuracy in percent over (inputs, targets) batches, in eval mode (the mode is restored); with a
    distributed group, over the union of every rank's loader."""
    device = model_device(model)
    correct = total = 0
    failure = None
    with eval_mode(model):
        try:
            for batch in loader:
                inputs, targets = split_batch(batch, "accuracy")
                correct += (model(inputs.to(device)).argmax(-1) == targets.to(device)).sum().item()
                total += targets.numel()
        except Exception as err:
            if group is None:
                raise
            failure = err  # raised on every rank by the counts' all-reduce
    if group is not None:
        counts = torch.tensor([float(correct), float(total)], device=device, dtype=torch.float64)
        distributed.all_reduce_outcome_([counts], group, failure, "computing an accuracy", device)
        correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def softmax_outputs(model: nn.Module, loader: Iterable, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, C) float64, labels (N,)) of the (x, y) batches of loader, in eval mode (restored), at most
    `limit` samples."""
    device = model_device(model)
    probs, labels, count = [], [], 0
    with eval_mode(model):
        for batch in loader:
            if limit is not None and count >= limit:
                break
            inputs, targets = split_batch(batch, "the MIA")
            probs.append(torch.softmax(model(inputs.to(device)).float(), dim=-1).cpu())
            labels.append(targets.cpu().view(-1))
            count += len(targets)
    if not probs:
        return np.empty((0, 0)), np.empty(0, dtype=np.int64)
    return torch.cat(probs)[:limit].double().numpy(), torch.cat(labels)[:limit].numpy()


def mia_features(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """SalUn's five MIA features of one split, each (N, d): see the module docstring."""
    if len(labels) == 0:
        return {name: np.empty((0, 1)) for name in MIA_FEATURES}
    rows = np.arange(len(labels))
    log_p = np.log(np.where(probs > 0, probs, 1e-30))
    plogp = np.where(probs > 0, probs * log_p, 0.0)
    present = np.zeros(probs.shape[1], dtype=bool)
    present[np.unique(labels)] = True  # SalUn indexes columns with the split's whole label vector
    m_entropy = -np.where(present, (1.0 - probs) * log_p, probs * log_p).sum(axis=1)
    return {"correctness": (probs.argmax(axis=1) == labels).astype(np.float64)[:, None],
            "confidence": probs[rows, labels][:, None],
            "entropy": -plogp.sum(axis=1)[:, None],
            "m_entropy": m_entropy[:, None],
            "prob": probs}


def true_label_confidence(model: nn.Module, loader: Iterable, limit: Optional[int] = None) -> np.ndarray:
    """softmax(model(x))[y] for the (x, y) batches of loader (eval mode, restored), at most `limit` samples."""
    probs, labels = softmax_outputs(model, loader, limit)
    return mia_features(probs, labels)["confidence"][:, 0] if len(labels) else np.empty(0)


def svc_mia(members: np.ndarray, non_members: np.ndarray, targets: np.ndarray) -> float:
    """Share (0..1) of `targets` that an RBF SVC fitted on members (1) vs non-members (0) calls non-members.
    Each array is (N,) for one scalar feature or (N, d)."""
    from sklearn.svm import SVC

    if len(members) == 0 or len(non_members) == 0 or len(targets) == 0:
        raise ValueError(f"the MIA needs members, non-members and targets, got {len(members)}, "
                         f"{len(non_members)} and {len(targets)} samples")
    features = np.concatenate([members, non_members]).reshape(len(members) + len(non_members), -1)
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    return float(1.0 - clf.predict(targets.reshape(len(targets), -1)).mean())


def mia_variants(model: nn.Module, retain_loader: Iterable, test_loader: Iterable, forget_loader: Iterable,
                 features: tuple = MIA_FEATURES) -> dict[str, float]:
    """SalUn's SVC_MIA_forget_efficacy on each of `features` (names from MIA_FEATURES), in percent. The members are
    the first len(test) retain samples, as SalUn takes them: pass an unshuffled retain loader for a deterministic
    result."""
    unknown = [f for f in features if f not in MIA_FEATURES]
    if unknown or not features:
        raise ValueError(f"features must be names from {MIA_FEATURES}, got {features!r}")
    test_probs, test_labels = softmax_outputs(model, test_loader)
    retain = mia_features(*softmax_outputs(model, retain_loader, limit=len(test_labels)))
    test, forget = mia_features(test_probs, test_labels), mia_features(*softmax_outputs(model, forget_loader))
    return {name: 100.0 * svc_mia(retain[name], test[name], forget[name]) for name in features}


def mia_efficacy(model: nn.Module, retain_loader: Iterable, test_loader: Iterable, forget_loader: Iterable) -> float:
    """The headline MIA: mia_variants on the confidence feature, in percent."""
    return mia_variants(model, retain_loader, test_loader, forget_loader, ("confidence",))["confidence"]


def evaluate(model: nn.Module, forget_loader: Iterable, retain_loader: Iterable, test_loader: Iterable) -> dict:
    """{"UA", "RA", "TA", "MIA", "MIA_correctness", "MIA_entropy", "MIA_m_entropy", "MIA_prob"} in percent (see the
    module docstring; MIA is the confidence variant)."""
    mia = mia_variants(model, retain_loader, test_loader, forget_loader)
    return {"UA": 100.0 - accuracy(model, forget_loader), "RA": accuracy(model, retain_loader),
            "TA": accuracy(model, test_loader), "MIA": mia.pop("confidence"),
            **{f"MIA_{name}": value for name, value in mia.items()}}


def avg_gap(metrics: dict, retrain: dict) -> float:
    """SalUn's "Avg. Gap": the mean absolute difference to the Retrain model over UA, RA, TA and MIA."""
    return sum(abs(metrics[key] - retrain[key]) for key in METRICS) / len(METRICS)
