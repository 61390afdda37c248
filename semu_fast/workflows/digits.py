"""The embedded toy task: scikit-learn's bundled 8x8 digits (1797 images, no download), a small CNN classifier and
a tiny class-conditional diffusers UNet for them. Data and architectures only (training lives with the workflows)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

DIGITS_NUM_CLASSES = 10
DIGITS_NULL_CLASS = 10          # the UNet's class-embedding row for "no class" (classifier-free guidance)


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


def digits_cnn(num_classes: int = DIGITS_NUM_CLASSES) -> nn.Module:
    """A small CNN with BatchNorm for 8x8 digits (about 30k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def digits_unet(num_classes: int = DIGITS_NUM_CLASSES):
    """A tiny class-conditional UNet2DModel for 8x8 one-channel digits (about 0.7M parameters): 8x8 (32 channels)
    -> 4x4 (64 channels, self-attention), one resnet per block; num_classes + 1 class embeddings (the last: null)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=8, attention_head_dim=16)


def digits_scheduler():
    """DDPMScheduler with 1000 steps and the cosine schedule (better than linear betas on tiny images)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
