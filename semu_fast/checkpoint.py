"""Checkpoints of sf.unlearn: the adapters once (after prepare), then the training state, rewritten atomically.

A folder holds `adapters/` (sf.save_adapters: U, Vh and the layer report, so a resumed run skips the gradient pass
and the SVDs) and `training_state.pt`: every R, the optimizer state, the random-label generator, the epoch and the
step within it, the history, the best R so far, and the model's buffers (BatchNorm statistics move when
norm_mode="train"). Resuming from it continues exactly where the last checkpoint stood."""
from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from ._checks import check_positive_int
from ._utils import atomic_write, is_stale_temporary, tensor_bytes

FORMAT = "semu_fast.training_state/3"
# what earlier formats lack for a resume to be exact: each is refused with the reason
_EARLIER = {"semu_fast.training_state/1": "the random state an exact resume needs",
            "semu_fast.training_state/2": "the digest of their data (a resume could not tell other data)"}
STATE_NAME = "training_state.pt"
ADAPTERS_NAME = "adapters"


def data_identity(loader) -> str:
    """A digest of the data a loader reads, so that a resumed run refuses other data: exact for batches held in
    memory (a list of tensors or dicts), list, TensorDataset, Subset (its indices), ConcatDataset and Hugging Face
    datasets (their own fingerprint), and loaders that combine others through a `data_parts()` method; for any
    other dataset, its type and length only (reading samples could run random transforms). A DataLoader's batch
    size is part of it, the order of its shuffle is not."""
    digest = hashlib.sha256()

    def add(item) -> None:
        if isinstance(item, torch.Tensor):
            digest.update(f"tensor{item.dtype}{tuple(item.shape)}".encode())
            digest.update(tensor_bytes(item))
        elif isinstance(item, np.ndarray):
            digest.update(f"array{item.dtype}{item.shape}".encode())
            digest.update(np.ascontiguousarray(item).tobytes())
        elif isinstance(item, (str, numbers.Number, np.generic, type(None))):
            digest.update(f"{type(item).__name__}:{item!r};".encode())
        elif isinstance(item, Mapping):
            for key in sorted(item, key=str):
                add(str(key))
                add(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"seq{len(item)}[".encode())
            for element in item:
                add(element)
            digest.update(b"]")
        else:
            dataset(item)

    def dataset(data) -> None:
        if isinstance(data, torch.utils.data.DataLoader):
            add(f"batches of {data.batch_size}, drop_last {data.drop_last}")
            dataset(data.dataset)
        elif isinstance(data, Subset):
            add(list(map(int, data.indices)))
            dataset(data.dataset)
        elif isinstance(data, TensorDataset):
            add(list(data.tensors))
        elif isinstance(data, ConcatDataset):
            for part in data.datasets:
                dataset(part)
        elif isinstance(data, (list, tuple)):  # a DataLoader over samples held in a list
            add(data)
        elif callable(getattr(data, "data_parts", None)):
            for part in data.data_parts():
                dataset(part)
        elif isinstance(getattr(data, "_fingerprint", None), str):  # datasets.Dataset
            add(data._fingerprint)
        else:
            try:
                size = len(data)
            except TypeError:
                size = None
            add(f"{type(data).__module__}.{type(data).__qualname__}:{size}")

    dataset(loader)
    return digest.hexdigest()


def _is_adapter_factor(name: str) -> bool:
    return name.endswith((".U", ".Vh"))


def model_buffers(semu_model) -> dict:
    """The model's buffers (norm statistics) as a checkpoint keeps them: on the CPU, without the adapters' U, Vh."""
    return {n: b.detach().cpu() for n, b in semu_model.named_buffers() if not _is_adapter_factor(n)}


def buffers_digest(buffers: dict) -> str:
    digest = hashlib.sha256()
    for name, value in buffers.items():
        digest.update(name.encode())
        digest.update(tensor_bytes(value))
    return digest.hexdigest()


class Checkpoint:
    """Where and how often sf.unlearn saves. folder None: disabled. every: steps between saves (None: at the end
    of each epoch only). settings: the training arguments a resumed run must share."""

    def __init__(self, folder, every: Optional[int], settings: dict):
        check_positive_int("checkpoint_every", every, optional=True)
        if every is not None and folder is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (where to write the checkpoints)")
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ValueError(f"checkpoint_dir {str(folder)!r} exists and is not a folder")
        self.folder = None if folder is None else Path(folder)
        self.every = every
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    @property
    def adapters_dir(self) -> Path:
        return self.folder / ADAPTERS_NAME

    def due(self, step: int) -> bool:
        return self.enabled and self.every is not None and step % self.every == 0

    def load(self) -> Optional[dict]:
        """The saved state, or None when there is none. Refuses a corrupted one or one from other settings."""
        if not self.enabled or not (self.folder / STATE_NAME).exists():
            return None
        path = self.folder / STATE_NAME
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a damaged file
            raise ValueError(f"{path} is corrupted or truncated ({err}); delete it to start afresh") from None
        if isinstance(state, dict) and state.get("format") in _EARLIER:
            raise ValueError(f"{path} was written by an earlier semu_fast, whose checkpoints lack "
                             f"{_EARLIER[state['format']]}; start afresh with resume=False (the adapters there load "
                             f"with sf.load_adapters)")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} checkpoint")
        differ = sorted(k for k, v in self.settings.items() if state["settings"].get(k) != v)
        if differ:
            raise ValueError(f"{path} was written by another run: {', '.join(differ)} differ (the SEMU config, the "
                             f"targeted layers and their weights, the data and the optimizer settings must all "
                             f"match); pass the same ones, use another checkpoint_dir, or resume=False")
        return state

    def save_adapters(self, semu_model, group) -> None:
        """After prepare: the adapters, and no stale training state from an earlier run."""
        if not self.enabled or (group is not None and group.rank != 0):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / STATE_NAME).unlink(missing_ok=True)
        semu_model.save_adapters(self.adapters_dir)

    def save(self, run: dict, semu_model, optimizer, generator: torch.Generator, group, rng: dict) -> None:
        """rng: torch's random state and the loaders' shuffling generators' now, per rank (the trainer puts them
        back)."""
        if group is not None and group.rank != 0:  # every rank holds the same R
            return
        for stale in self.folder.glob(f".{STATE_NAME}.*.tmp"):  # left by a save that was killed
            if is_stale_temporary(stale):  # (not another run's save in flight)
                stale.unlink(missing_ok=True)
        state = {
            "format": FORMAT, "settings": self.settings, "run": run,
            "R": {name: a.R.detach().cpu() for name, a in semu_model.adapters.items()},
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "rng": rng,
            "buffers": model_buffers(semu_model),
        }
        atomic_write(self.folder / STATE_NAME, lambda tmp: torch.save(state, tmp))

    @staticmethod
    def restore(state: dict, semu_model, optimizer, generator: torch.Generator) -> dict:
        """Put a saved state back into the model, optimizer and generator; returns the run record."""
        adapters = semu_model.adapters
        if set(state["R"]) != set(adapters):
            raise ValueError(f"the checkpoint holds R for layers {sorted(state['R'])} but the adapters are "
                             f"{sorted(adapters)}")
        with torch.no_grad():
            for name, R in state["R"].items():
                adapters[name].R.copy_(R)
            buffers = dict(semu_model.named_buffers())
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        run = dict(state["run"])
        device = next(iter(adapters.values())).R.device
        if run["best_state"] is not None:
            run["best_state"] = [t.to(device) for t in run["best_state"]]
        return run
