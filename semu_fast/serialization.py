"""The SEMU adapter folder on plain tensors and dicts. This module never imports the model classes: semu_fast.model
turns a SEMUModel into these pieces and back.

A folder holds adapter_config.json (format, SEMUConfig as a dict, each layer's kind, shape, ranks and a fingerprint
of the base weight it was made for, the report, and the name and SHA-256 of the weights file) and that weights file,
adapters-<digest>.safetensors ("<layer>.R", ".U", ".Vh"). U and Vh are saved because they come from the forget-set
gradients and cannot be rebuilt from the base weights.

Saving is atomic for the folder as a whole: the new weights file gets a new name, then the config that names it
replaces the old config in one rename (the commit), then the files of older saves go, and the temporaries of killed
saves: at once where their process (of this machine) is gone, else an hour later (a younger one may be another
machine's save in flight). A save killed at any point leaves a folder that loads as the old set or the new one, never
a mix. Saves into one folder at once (every rank of a run) take turns and loads wait for them, through a lock on the
folder where the file system has one. Loading checks the digest, that the tensors are exactly the config's layers,
and that every value is finite."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ._utils import atomic_write, folder_lock, is_stale_temporary, tensor_bytes
from .distributed import is_sharded

FORMAT = "semu_fast.adapters/2"
OLD_FORMAT = "semu_fast.adapters/1"  # a fixed adapters.safetensors, without digests: still read
CONFIG_NAME = "adapter_config.json"
OLD_WEIGHTS_NAME = "adapters.safetensors"
_WEIGHTS = re.compile(r"adapters-[0-9a-f]{16}\.safetensors")
_TEMPORARY = re.compile(r"\.(adapter_config\.json|adapters-[0-9a-f]{16}\.safetensors)\..+\.tmp")  # atomic_write's


def factor_shapes(kind: str, weight_shape, k: int) -> dict[str, tuple]:
    """The shapes of R, U and Vh for a layer of `kind` ("linear", "conv1d", "column_linear" or "conv2d") with this
    weight shape and rank k (a Conv1D's weight is stored (in, out); a per-column Linear is a 1x1 conv)."""
    out, cin = weight_shape[:2] if kind != "conv1d" else tuple(weight_shape)[::-1]
    if kind in ("linear", "conv1d"):
        return {"U": (out, k), "R": (k, k), "Vh": (k, cin)}
    khw = 1 if kind == "column_linear" else weight_shape[2] * weight_shape[3]
    return {"U": (cin, out, k), "R": (cin, k, k), "Vh": (cin, k, khw)}


FINGERPRINT_SAMPLE = 65536  # elements hashed per weight: every row of an LLM's projections, under a millisecond


def fingerprint(weight: torch.Tensor) -> dict:
    """A cheap identity of a weight's values: its shape, dtype, and the SHA-256 of the exact bytes of a fixed sample
    of at most FINGERPRINT_SAMPLE elements spread over the whole weight (bytes, not sums: the same values give the same
    digest on any device). The sample's stride is coprime to the row length, so it visits every row of a weight up
    to FINGERPRINT_SAMPLE x row-length elements, at columns that shift from row to row. Other weights (another seed,
    checkpoint, fine-tune or dtype) give another digest; an FSDP2-sharded weight is identified by its shape and dtype
    only."""
    identity = _identity(weight)
    if is_sharded(weight):  # FSDP2: each rank holds a shard; gathering every weight to hash it costs too much
        return identity
    flat = weight.detach().reshape(-1)
    row = weight.shape[-1] if weight.dim() else 1
    stride = max(1, -(-flat.numel() // FINGERPRINT_SAMPLE))  # rounded up: the sample reaches the last rows
    while math.gcd(stride, row) != 1:
        stride += 1
    return {**identity, "spread_sha256": _digest(flat[::stride])}


def matches_fingerprint(weight: torch.Tensor, saved: dict) -> bool:
    """Whether `weight` is the one `saved` (a fingerprint) was taken of, judged on what both record: a fingerprint
    without a content hash (an FSDP2-sharded weight's: shape and dtype only) and an FSDP2-sharded weight (hashing it
    would gather it) are compared on shape and dtype alone, so adapters saved from an FSDP2 run load onto the
    unsharded model and the other way round. A fingerprint of the first scheme ("sample_sha256": at most 4096 evenly
    spaced elements, a single column of a 4096-wide square weight) is checked by that scheme."""
    if not isinstance(saved, dict):  # a damaged config
        return False
    identity = _identity(weight)
    if set(saved) == set(identity) or is_sharded(weight):
        return {key: saved.get(key) for key in identity} == identity
    if "sample_sha256" in saved:
        flat = weight.detach().reshape(-1)
        return {**identity, "sample_sha256": _digest(flat[::max(1, flat.numel() // 4096)])} == saved
    return fingerprint(weight) == saved


def _identity(weight: torch.Tensor) -> dict:
    return {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}


def _digest(values: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(values)).hexdigest()


def write_folder(path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write the tensors and the JSON config into folder `path` (created if needed), atomically as a whole."""
    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"{folder} is a file: the adapters are saved as a folder (give a folder path)")
    previous = saved_format(folder)
    if previous not in (None, FORMAT, OLD_FORMAT):
        raise ValueError(f"{folder / CONFIG_NAME} exists and is not a SEMU adapter config (a peft LoRA folder?): save "
                         f"the adapters into another folder")
    folder.mkdir(parents=True, exist_ok=True)
    data = save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, metadata={"format": FORMAT})
    digest = hashlib.sha256(data).hexdigest()
    weights_name = f"adapters-{digest[:16]}.safetensors"
    text = json.dumps({"format": FORMAT, "weights_file": weights_name, "weights_sha256": digest, **config}, indent=2)
    # Saves into one folder at once (every rank at the end of a script) take turns: else one's cleanup removes the
    # weights another has written and is about to commit, and that config names a missing file.
    with folder_lock(folder):
        atomic_write(folder / weights_name, lambda tmp: Path(tmp).write_bytes(data))  # removes its temporary on error
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))  # the commit
        for stale in folder.iterdir():  # older saves' weights, and temporaries a killed save left; nothing else
            if (_WEIGHTS.fullmatch(stale.name) and stale.name != weights_name) \
                    or (_TEMPORARY.fullmatch(stale.name) and is_stale_temporary(stale)) \
                    or (stale.name == OLD_WEIGHTS_NAME and previous == OLD_FORMAT):
                stale.unlink(missing_ok=True)


def saved_format(folder: Path) -> Optional[str]:
    """The format an existing adapter_config.json in `folder` declares (None: there is none; "" when it declares
    none, e.g. a peft LoRA's or a damaged one)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    return config.get("format", "") if isinstance(config, dict) and isinstance(config.get("format", ""), str) else ""


def read_folder(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder; errors name the file and what is wrong with it."""
    folder = Path(path)
    with folder_lock(folder, shared=True):  # a save in flight would remove the weights the config read names
        config = _read_config(folder)
        weights = folder / config.get("weights_file", OLD_WEIGHTS_NAME)
        try:
            data = weights.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"no {weights.name} in {folder} (named by its {CONFIG_NAME})") from None
    if config["format"] == FORMAT and hashlib.sha256(data).hexdigest() != config.get("weights_sha256"):
        raise ValueError(f"{weights} does not match the SHA-256 its {CONFIG_NAME} records: the file is corrupted")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is corrupted or truncated ({err})") from None
    expected = {f"{name}.{part}" for name in config["layers"] for part in ("R", "U", "Vh")}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ValueError(f"{weights} does not hold exactly the layers of its {CONFIG_NAME}: tensors without a layer "
                         f"{extra[:6]}, layers without tensors {missing[:6]}")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{weights} holds NaN or Inf in {', '.join(sorted(bad)[:6])}")
    return config, tensors


def _read_config(folder: Path) -> dict:
    if folder.is_file():
        raise ValueError(f"{folder} is a file: pass the adapter folder (the one holding {CONFIG_NAME})")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a saved SEMU adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is corrupted ({err})") from None
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, OLD_FORMAT) \
            or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} adapter config")
    bad = [name for name, info in config["layers"].items() if not isinstance(info, dict)]
    if bad or not isinstance(config.get("semu_config", {}), dict) or not isinstance(config.get("report", {}), dict):
        raise ValueError(f"{folder / CONFIG_NAME} is damaged: " + (f"layer {bad[0]!r} is not an object" if bad else
                                                                   "semu_config and report must be objects"))
    name = config.get("weights_file", OLD_WEIGHTS_NAME)
    if not isinstance(name, str) or os.sep in name or name.startswith("."):
        raise ValueError(f"{folder / CONFIG_NAME} names an invalid weights file {name!r}")
    return config
