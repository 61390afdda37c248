"""The SEMU adapter folder on plain tensors and dicts: adapters.safetensors ("<layer>.R", ".U", ".Vh") and
adapter_config.json (format, SEMUConfig as a dict, each layer's kind, shape and ranks, the report). U and Vh are
saved because they come from the forget-set gradients and cannot be rebuilt from the base weights.

This module never imports the model classes: semu_fast.model turns a SEMUModel into these pieces and back."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._utils import atomic_write

FORMAT = "semu_fast.adapters/1"
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"


def factor_shapes(kind: str, weight_shape, k: int) -> dict[str, tuple]:
    """The shapes of R, U and Vh for a layer of `kind` ("linear" or "conv2d") with this weight shape and rank k."""
    out, cin = weight_shape[:2]
    if kind == "linear":
        return {"U": (out, k), "R": (k, k), "Vh": (k, cin)}
    khw = weight_shape[2] * weight_shape[3]
    return {"U": (cin, out, k), "R": (cin, k, k), "Vh": (cin, k, khw)}


def write_folder(path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write the tensors and the JSON config into folder `path` (created if needed), each file atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **config}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def read_folder(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder; errors name the file and what is wrong with it."""
    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a saved SEMU adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is corrupted ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} adapter config")
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{folder / WEIGHTS_NAME} is corrupted or truncated ({err})") from None
    return config, tensors
