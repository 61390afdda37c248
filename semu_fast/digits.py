"""The embedded default task: scikit-learn's bundled 8x8 digits (1797 images, no download) and a small CNN."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger("semu_fast")


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


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, lr: float = 3e-3,
                     seed: int = 0, progress: bool = False) -> nn.Module:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = loader(x, y, batch_size=64, shuffle=True, seed=seed)
    model.train()
    for _ in tqdm(range(epochs), desc="train digits CNN", disable=not progress):
        for inputs, targets in data:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()
    return model.eval()


def pretrained_digits_cnn(cache_dir: Optional[Path] = None, seed: int = 0, progress: bool = False) -> nn.Module:
    """The digits CNN trained on the training split, cached as a state dict under cache_dir when given."""
    model = digits_cnn()
    path = Path(cache_dir) / f"digits_cnn_seed{seed}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("loaded the digits CNN from %s", path)
        return model.eval()
    (x_train, y_train), _ = load_digits_split(seed)
    train_classifier(model, x_train, y_train, seed=seed, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model
