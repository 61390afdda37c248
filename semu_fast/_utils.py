"""Small helpers every layer above the ops shares (a leaf: it imports nothing of semu_fast)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn


def default_device() -> str:
    """Where work goes when the caller names no device: CUDA when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_rng_state() -> dict:
    """torch's global random state (dropout, unseeded shuffles): the CPU's, and every GPU's once CUDA is in use."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_torch_rng_state(state: dict) -> None:
    """Put back what torch_rng_state returned (its GPU part when this process sees as many GPUs)."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_cache() -> Path:
    """Where semu_fast keeps what it trains or measures once (models, the SVD cost calibration): $SEMU_FAST_CACHE,
    else ~/.cache/semu_fast."""
    return Path(os.environ.get("SEMU_FAST_CACHE", Path.home() / ".cache" / "semu_fast"))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def split_batch(batch, what: str = "loss_fn=None"):
    """(inputs, targets) from a batch that is a tuple or list of at least two tensors."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(
            isinstance(t, torch.Tensor) for t in batch[:2]):
        raise TypeError(f"{what} expects batches of (inputs, targets) tensors, got {type(batch).__name__}; "
                        f"pass loss_fn(model, batch) -> scalar for other batch layouts")
    return batch[0], batch[1]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's values (on the CPU, in its dtype, in row-major order): what a digest hashes."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """The models in eval mode inside the block, each of their modules given back its own training flag afterwards
    (also on error; model.train(flag) would set one flag for all of them)."""
    flags = {module: module.training for m in models for module in m.modules()}
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def atomic_write(path, write) -> None:
    """write(tmp_path) then rename over path: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere the set-and-restore,
    which other threads could race with, is the only way)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask
