"""SEMUModel: a model with SEMU adapters installed, and the ways to merge, disable, save or remove them."""
from __future__ import annotations

import contextlib

import torch.nn as nn

from .adapters import SEMUAdapter
from .config import SEMUConfig
from .report import SEMUReport


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
        from .io import save_adapters
        save_adapters(self, path)
