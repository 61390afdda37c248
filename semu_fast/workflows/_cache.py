"""Models trained here once and cached as state dicts (the embedded digits CNN and DDPM, originals trained with
--train-epochs): loaded when the file exists, else trained and saved atomically (a run killed mid-save must not
leave a cache that later fails to load)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .._utils import atomic_write

log = logging.getLogger("semu_fast")


def load_or_train(path: Optional[Path], build: Callable[[], nn.Module], train: Callable[[], nn.Module],
                  what: str) -> nn.Module:
    """build() with the state dict at `path` when it exists, else train() (cached at `path` when given); the
    model is returned in eval mode."""
    if path is not None and Path(path).exists():
        log.info("loaded the %s from %s", what, path)
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()
