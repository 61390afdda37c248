"""Saving and loading SEMU adapters: a folder with adapters.safetensors (R, U, Vh per layer) and
adapter_config.json (the SEMUConfig, each layer's kind, shape and ranks). U and Vh are saved because they come
from the forget-set gradients and cannot be rebuilt from the base weights."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .model import SEMUModel
from .report import LayerReport, SEMUReport

FORMAT = "semu_fast.adapters/1"
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapters(semu_model: SEMUModel, path) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, adapter in semu_model.adapters.items():
        for part in ("R", "U", "Vh"):
            tensors[f"{name}.{part}"] = getattr(adapter, part).detach().to("cpu").contiguous()
        layers[name] = {"kind": "conv2d" if isinstance(adapter, SEMUConv2d) else "linear",
                        "shape": list(adapter.base_layer.weight.shape), "k": adapter.rank, "ranks": adapter.ranks}
    config = {"format": FORMAT, "semu_config": semu_model.config.to_dict(), "layers": layers,
              "report": semu_model.report.to_dict()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def _read(folder: Path):
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


def _check_layer(model: nn.Module, name: str, info: dict, tensors: dict) -> nn.Module:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the adapter file has layer {name!r}, which the model does not have") from None
    kind = info.get("kind")
    expected = {"linear": nn.Linear, "conv2d": nn.Conv2d}.get(kind)
    if expected is None or not isinstance(layer, expected):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__} but the adapter file holds a {kind} adapter")
    if list(layer.weight.shape) != list(info.get("shape", [])):
        raise ValueError(f"layer {name!r} has weight shape {tuple(layer.weight.shape)} but the adapters were "
                         f"made for {tuple(info.get('shape', []))}")
    k = info.get("k")
    out, cin = layer.weight.shape[:2]
    if kind == "linear":
        want = {"U": (out, k), "R": (k, k), "Vh": (k, cin)}
    else:
        khw = layer.weight.shape[2] * layer.weight.shape[3]
        want = {"U": (cin, out, k), "R": (cin, k, k), "Vh": (cin, k, khw)}
    for part, shape in want.items():
        tensor = tensors.get(f"{name}.{part}")
        if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
            got = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"the adapter file's {name}.{part} should be a float tensor of shape {shape}, got {got}")
    return layer


def load_adapters(model: nn.Module, path) -> SEMUModel:
    """Install the adapters saved in folder `path` on `model` (the original model, without adapters).

    Everything is checked (files intact, every layer present with the same type and shape) before the model is
    changed; R, U and Vh come back exactly as saved."""
    folder = Path(path)
    config, tensors = _read(folder)
    layers = {name: _check_layer(model, name, info, tensors) for name, info in config["layers"].items()}
    semu_config = SEMUConfig.from_dict(config["semu_config"])
    adapters = {}
    for name, layer in layers.items():
        info = config["layers"][name]
        U, Vh = tensors[f"{name}.U"], tensors[f"{name}.Vh"]
        adapter = SEMUConv2d(layer, U, Vh, info.get("ranks")) if info["kind"] == "conv2d" else \
            SEMULinear(layer, U, Vh)
        with torch.no_grad():
            adapter.R.copy_(tensors[f"{name}.R"])
        adapters[name] = adapter
    report = SEMUReport(layers=[LayerReport(**{**entry, "shape": tuple(entry["shape"])})
                                for entry in config.get("report", {}).get("layers", [])],
                        total_params=config.get("report", {}).get("total_params", 0))
    return SEMUModel(model, adapters, semu_config, report)
