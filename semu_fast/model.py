"""SEMUModel: a model with SEMU adapters installed, and the ways to merge, disable, save, load or remove them."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from . import serialization
from .adapters import SEMUAdapter, SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .report import LayerReport, SEMUReport


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


class SEMUModel(nn.Module):
    """Wraps `model` (changed in place: each adapted layer is swapped for its adapter) and forwards to it.

    Only the adapters' R matrices require grad; every other parameter's requires_grad is restored by unload()
    and merge_and_unload()."""

    def __init__(self, model: nn.Module, adapters: dict[str, SEMUAdapter], config: SEMUConfig, report: SEMUReport):
        super().__init__()
        self.model = model
        self.config = config
        self.report = report
        self._saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for param in model.parameters():
            param.requires_grad_(False)
        for name, adapter in adapters.items():
            replace_module(model, name, adapter)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def adapters(self) -> dict[str, SEMUAdapter]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SEMUAdapter)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [adapter.R for adapter in self.adapters.values()]

    def merge_adapters(self) -> None:
        """Write W + U R Vh into every adapted weight (reversible with unmerge_adapters)."""
        for adapter in self.adapters.values():
            adapter.merge()

    def unmerge_adapters(self) -> None:
        """Give every merged weight back bit for bit."""
        for adapter in self.adapters.values():
            adapter.unmerge()

    @contextlib.contextmanager
    def merged(self):
        """The adapters merged into the weights inside the block (a faster forward, e.g. for sampling), the weights
        given back bit for bit afterwards; adapters merged before the block stay merged."""
        unmerged = [a for a in self.adapters.values() if not a.merged]
        try:
            for adapter in unmerged:
                adapter.merge()
            yield self
        finally:
            for adapter in unmerged:
                adapter.unmerge()

    @contextlib.contextmanager
    def disable_adapters(self):
        """Run the original model inside the block (merged weights are unmerged for it, then merged again)."""
        adapters = list(self.adapters.values())
        merged = [a for a in adapters if a.merged]
        for adapter in merged:
            adapter.unmerge()
        for adapter in adapters:
            adapter.disabled = True
        try:
            yield self
        finally:
            for adapter in adapters:
                adapter.disabled = False
            for adapter in merged:
                adapter.merge()

    def _remove_adapters(self) -> nn.Module:
        for name, adapter in self.adapters.items():
            replace_module(self.model, name, adapter.base_layer)
        for param, flag in self._saved_requires_grad:
            param.requires_grad_(flag)
        return self.model

    def unload(self) -> nn.Module:
        """The original model with its original layers and weights (bit for bit); the adapters are dropped."""
        self.unmerge_adapters()
        return self._remove_adapters()

    def merge_and_unload(self) -> nn.Module:
        """The original model with W + U R Vh written into each adapted layer: a plain model, permanently changed."""
        for adapter in self.adapters.values():
            adapter.merge()
            adapter._original_weight = None
        return self._remove_adapters()

    def save_adapters(self, path) -> None:
        """Write R, U, Vh and the ranks of every adapter to the folder `path` (safetensors + JSON), atomically."""
        save_adapters(self, path)


def save_adapters(semu_model: SEMUModel, path) -> None:
    """Write semu_model's adapters (R, U, Vh, ranks), its SEMUConfig and its report to the folder `path`."""
    tensors, layers = {}, {}
    for name, adapter in semu_model.adapters.items():
        for part in ("R", "U", "Vh"):
            tensors[f"{name}.{part}"] = getattr(adapter, part)
        layers[name] = {"kind": adapter.kind, "shape": list(adapter.base_layer.weight.shape), "k": adapter.rank,
                        "ranks": adapter.ranks}
    serialization.write_folder(path, tensors, {"semu_config": semu_model.config.to_dict(), "layers": layers,
                                               "report": semu_model.report.to_dict()})


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
    for part, shape in serialization.factor_shapes(kind, layer.weight.shape, info.get("k")).items():
        tensor = tensors.get(f"{name}.{part}")
        if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
            got = None if tensor is None else f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            raise ValueError(f"the adapter file's {name}.{part} should be a float tensor of shape {shape}, got {got}")
    return layer


def load_adapters(model: nn.Module, path) -> SEMUModel:
    """Install the adapters saved in folder `path` on `model` (the original model, without adapters).

    Everything is checked (files intact, every layer present with the same type and shape) before the model is
    changed; R, U and Vh come back exactly as saved."""
    config, tensors = serialization.read_folder(path)
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
    saved_report = config.get("report", {})
    report = SEMUReport(layers=[LayerReport(**{**entry, "shape": tuple(entry["shape"])})
                                for entry in saved_report.get("layers", [])],
                        total_params=saved_report.get("total_params", 0))
    return SEMUModel(model, adapters, semu_config, report)
