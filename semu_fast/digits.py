"""The embedded default task: scikit-learn's bundled 8x8 digits (1797 images, no download) and a small CNN."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """((x_train, y_train), (x_test, y_test)): float32 images (N, 1, 8, 8) in [0, 1], int64 labels; seeded split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN with BatchNorm for 8x8 digits (about 30k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def pretrained_digits_cnn(cache_dir: Optional[Path] = None, seed: int = 0, progress: bool = False) -> nn.Module:
    """The digits CNN trained on the training split (30 epochs of Adam), cached under cache_dir when given."""
    from .classification import load_task, original_model

    return original_model(load_task("digits", seed=seed), "digits-cnn", cache_dir=cache_dir, seed=seed,
                          progress=progress)
