"""Small helpers every layer above the ops shares (a leaf: it imports nothing of semu_fast)."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed
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


def length_or_none(loader) -> Optional[int]:
    """len(loader), or None for a loader without one (a generator, a DataLoader over an IterableDataset)."""
    try:
        return len(loader)
    except TypeError:
        return None


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
    """write(tmp_path) then rename over path: a crash leaves the old file or the new one, never half of one. The
    temporary, ".<name>.<random>.<pid>@<host>.tmp", names its writer (see is_stale_temporary)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{_owner()}.tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STALE_TEMPORARY_S = 3600  # a temporary this old is a killed writer's: no save of a folder takes an hour
_OWNER = re.compile(r"\.(\d+)@([^@]+)\.tmp\Z")  # how atomic_write's temporaries end: .<pid>@<host>.tmp


def _host() -> str:
    """This machine's name in file-name-safe characters."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _owner() -> str:
    """This process as atomic_write's temporaries name it: pid@host."""
    return f"{os.getpid()}@{_host()}"


def is_stale_temporary(path) -> bool:
    """Whether no writer can still own the temporary file `path` (one atomic_write left): its writer, a process of
    this machine, is gone, or (another machine's, or a temporary that names no writer) it was last written
    STALE_TEMPORARY_S or more ago. A younger one may be another process's save in flight, which removing would break
    (its rename fails). A file already gone is not stale."""
    path = Path(path)
    owner = _OWNER.search(path.name)
    if owner and owner[2] == _host() and os.name == "posix":  # (Windows' os.kill would end the process)
        try:
            os.kill(int(owner[1]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except (OSError, OverflowError):  # another user's process (it exists), or no valid pid
            pass
    try:
        return time.time() - path.stat().st_mtime >= STALE_TEMPORARY_S
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def folder_lock(folder, shared: bool = False):
    """Hold a lock on `folder` (flock on the folder itself: no lock file, and the OS drops a killed process's lock)
    for the block: exclusive, so that writers of one folder (ranks, threads) take turns, or (shared) for readers,
    who then see no writer's half-done work. Where the folder cannot be locked (Windows, a network file system
    without flock), the block runs unlocked."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


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
