"""SEMUModel: a model with SEMU adapters installed, and the ways to merge, disable, save, load or remove them."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from . import serialization
from .adapters import SEMUAdapter, SEMUColumnLinear, SEMUConv1D, SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .layers import check_shared_weights, is_conv1d
from .report import SEMUReport


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def replace_everywhere(model: nn.Module, swaps: dict[nn.Module, nn.Module]) -> None:
    """Put swaps[old] in place of each `old` under every name it is reachable by in `model` (one module may be
    registered under several, an alias such as self.out = self.proj, and named_modules() lists the first only): a
    forward through any of them reaches the new module."""
    names = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if name and m in swaps]
    for name, old in names:
        replace_module(model, name, swaps[old])


def check_finite_adapters(adapters: dict, action: str) -> None:
    """Refuse, before anything is written, adapters whose R, U or Vh hold NaN or Inf (R trained by a loop that
    diverged, say): merging would write them into the base weights, saving would replace a good adapter folder with
    one that load_adapters refuses."""
    bad = {name: parts for name, adapter in adapters.items() if (parts := adapter.nonfinite_factors())}
    if bad:
        where = "; ".join(f"{name}: {', '.join(parts)}" for name, parts in list(bad.items())[:6])
        raise FloatingPointError(f"cannot {action}: NaN or Inf in the adapters of {len(bad)} layer(s) ({where}); "
                                 f"nothing was written")


class BaseMismatchError(ValueError):
    """Saved adapters meet other base weights than the ones they were made for (load_adapters, check_base)."""


class SEMUModel(nn.Module):
    """Wraps `model` (changed in place: each adapted layer is swapped for its adapter) and forwards to it.

    Only the adapters' R matrices require grad; every other parameter's requires_grad is restored by unload()
    and merge_and_unload(). After those two the SEMUModel is detached: it holds no adapters any more, and calls that
    would act on them (save, merge, unmerge, disable, unload) raise instead of silently doing nothing."""

    def __init__(self, model: nn.Module, adapters: dict[str, SEMUAdapter], config: SEMUConfig, report: SEMUReport):
        super().__init__()
        self.model = model
        self.config = config
        self.report = report
        self._saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._detached_by = None
        for param in model.parameters():
            param.requires_grad_(False)
        # under every name of each layer: a forward through any of them uses the adapter
        replace_everywhere(model, {adapter.base_layer: adapter for adapter in adapters.values()})

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def adapters(self) -> dict[str, SEMUAdapter]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SEMUAdapter)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [adapter.R for adapter in self.adapters.values()]

    def _attached(self, action: str) -> None:
        if self._detached_by is not None:
            raise RuntimeError(f"cannot {action}: this SEMUModel was detached by {self._detached_by}() and holds no "
                               f"adapters any more (its model is the plain one); keep the adapters with "
                               f"save_adapters() before unloading, or load them again with sf.load_adapters()")

    def merge_adapters(self) -> None:
        """Write W + U R Vh into every adapted weight (reversible with unmerge_adapters)."""
        self._attached("merge_adapters")
        adapters = self.adapters
        check_finite_adapters(adapters, "merge the adapters")  # all or nothing
        for adapter in adapters.values():
            adapter.merge()

    def unmerge_adapters(self) -> None:
        """Give every merged weight back bit for bit."""
        self._attached("unmerge_adapters")
        for adapter in self.adapters.values():
            adapter.unmerge()

    @contextlib.contextmanager
    def merged(self):
        """The adapters merged into the weights inside the block (a faster forward, e.g. for sampling), the weights
        given back bit for bit afterwards; adapters merged before the block are merged again from the current R and
        stay merged."""
        self._attached("merge the adapters")
        check_finite_adapters(self.adapters, "merge the adapters")
        adapters = list(self.adapters.values())
        unmerged = [a for a in adapters if not a.merged]
        try:
            for adapter in adapters:  # those merged before too: from the current R
                adapter.merge()
            yield self
        finally:
            if self._detached_by is None:  # unload() or merge_and_unload() inside the block settled the weights
                for adapter in unmerged:
                    adapter.unmerge()

    @contextlib.contextmanager
    def disable_adapters(self):
        """Run the original model inside the block (merged weights are unmerged for it, then merged again). Blocks
        nest; merging inside one is refused."""
        self._attached("disable_adapters")
        adapters = list(self.adapters.values())
        merged = [a for a in adapters if a.merged]
        disabled = [a.disabled for a in adapters]
        for adapter in merged:
            adapter.unmerge()
        for adapter in adapters:
            adapter.disabled = True
        try:
            yield self
        finally:
            if self._detached_by is None:  # unload() inside the block gave back the original weights: keep them
                for adapter, before in zip(adapters, disabled):
                    adapter.disabled = before
                for adapter in merged:
                    adapter.merge()

    def _remove_adapters(self, by: str) -> nn.Module:
        replace_everywhere(self.model, {adapter: adapter.base_layer for adapter in self.adapters.values()})
        for param, flag in self._saved_requires_grad:
            param.requires_grad_(flag)
        self._detached_by = by
        return self.model

    def unload(self) -> nn.Module:
        """The original model with its original layers and weights (bit for bit); the adapters are dropped."""
        self._attached("unload")
        self.unmerge_adapters()
        return self._remove_adapters("unload")

    def merge_and_unload(self) -> nn.Module:
        """The original model with W + U R Vh written into each adapted layer: a plain model, permanently changed."""
        self._attached("merge_and_unload")
        check_finite_adapters(self.adapters, "merge_and_unload")
        adapters = list(self.adapters.values())
        was_merged = [a.merged for a in adapters]
        try:
            for adapter in adapters:
                adapter.merge()
        except BaseException:  # all or nothing: the layers merged by this call are given back
            for adapter, before in zip(adapters, was_merged):
                if not before:
                    adapter.unmerge()
            raise
        for adapter in adapters:
            adapter._original_weight = None
        return self._remove_adapters("merge_and_unload")

    def save_adapters(self, path) -> None:
        """Write R, U, Vh and the ranks of every adapter to the folder `path` (safetensors + JSON), atomically."""
        save_adapters(self, path)


def base_model(model: nn.Module) -> nn.Module:
    """The wrapped model of a SEMUModel (its config, dtype and device), else the model itself."""
    return model.model if isinstance(model, SEMUModel) else model


def save_adapters(semu_model: SEMUModel, path) -> None:
    """Write semu_model's adapters (R, U, Vh, ranks), its SEMUConfig and its report to the folder `path`."""
    semu_model._attached("save_adapters")
    check_finite_adapters(semu_model.adapters, "save the adapters")  # an earlier save in `path` stays as it was
    tensors, layers = {}, {}
    for name, adapter in semu_model.adapters.items():
        for part in ("R", "U", "Vh"):
            tensors[f"{name}.{part}"] = getattr(adapter, part)
        weight = adapter._original_weight if adapter.merged else adapter.base_layer.weight
        layers[name] = {"kind": adapter.kind, "shape": list(weight.shape), "k": adapter.rank, "ranks": adapter.ranks,
                        "base_fingerprint": serialization.fingerprint(weight)}
    serialization.write_folder(path, tensors, {"semu_config": semu_model.config.to_dict(), "layers": layers,
                                               "report": semu_model.report.to_dict()})


# Wrappers whose prefix a saved layer name may carry: torch.compile's OptimizedModule and nn.DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _find_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(name in `model`, layer) for a saved layer name, also when it was saved from (or is loaded onto) a compiled or
    DataParallel wrapper of the model."""
    candidates = [name] + [name[len(p):] for p in _WRAPPER_PREFIXES if name.startswith(p)]
    candidates += [p + c for c in list(candidates) for p in _WRAPPER_PREFIXES]
    for candidate in candidates:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"the adapter file has layer {name!r}, which the model does not have")


def _check_layer(model: nn.Module, name: str, info: dict, tensors: dict, check_base: bool) -> tuple[str, nn.Module]:
    found, layer = _find_layer(model, name)
    kind = info.get("kind")
    expected = {"linear": nn.Linear, "column_linear": nn.Linear, "conv2d": nn.Conv2d}.get(kind)
    fits = is_conv1d(layer) if kind == "conv1d" else expected is not None and isinstance(layer, expected)
    if not fits:
        raise ValueError(f"layer {name!r} is a {type(layer).__name__} but the adapter file holds a {kind} adapter")
    if list(layer.weight.shape) != list(info.get("shape", [])):
        raise ValueError(f"layer {name!r} has weight shape {tuple(layer.weight.shape)} but the adapters were "
                         f"made for {tuple(info.get('shape', []))}")
    saved = info.get("base_fingerprint")
    if check_base and saved is not None and not serialization.matches_fingerprint(layer.weight, saved):
        raise BaseMismatchError(f"layer {name!r} holds other weights than the ones the adapters were made for "
                                f"(another checkpoint, seed or dtype?); load them onto that model, or pass "
                                f"check_base=False to apply them anyway")
    for part, shape in serialization.factor_shapes(kind, layer.weight.shape, info.get("k")).items():
        tensor = tensors.get(f"{name}.{part}")
        if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
            got = None if tensor is None else f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            raise ValueError(f"the adapter file's {name}.{part} should be a float tensor of shape {shape}, got {got}")
    ranks = info.get("ranks")
    if kind == "column_linear" or (kind == "conv2d" and ranks is not None):  # one rank per input channel (column)
        channels = serialization.factor_shapes(kind, layer.weight.shape, info.get("k"))["U"][0]
        if not isinstance(ranks, list) or len(ranks) != channels or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= info.get("k") for r in ranks):
            raise ValueError(f"the adapter file's ranks of layer {name!r} should be {channels} ints in "
                             f"[0, {info.get('k')}], got {str(ranks)[:80]}")
    return found, layer


def check_plain_model(model: nn.Module) -> None:
    """Adapters load onto the original model: not a SEMUModel, nor a model that already holds adapters."""
    if isinstance(model, SEMUModel):
        raise TypeError("model is a SEMUModel: load the adapters onto the original model (semu_model.unload() gives "
                        "it back)")
    if any(isinstance(m, SEMUAdapter) for m in model.modules()):
        raise ValueError("model already holds SEMU adapters; call unload() or merge_and_unload() first")


def load_adapters(model: nn.Module, path, *, check_base: bool = True) -> SEMUModel:
    """Install the adapters saved in folder `path` on `model` (the original model, without adapters).

    Everything is checked before the model is changed: the files intact (the weights' SHA-256), every layer present
    with the same type and shape, every value finite, and (check_base) each base weight the one the adapters were
    made for. R, U and Vh come back exactly as saved."""
    check_plain_model(model)
    config, tensors = serialization.read_folder(path)
    layers = {name: _check_layer(model, name, info, tensors, check_base) for name, info in config["layers"].items()}
    check_shared_weights(model, dict(layers.values()), remedy="load the adapters onto a model whose weights are "
                                                             "untied, as in the one they were made on")
    try:
        semu_config = SEMUConfig.from_dict(config["semu_config"])
        report = SEMUReport.from_dict(config.get("report", {}))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"the adapter folder's semu_config or report is damaged or from another version "
                         f"({type(err).__name__}: {err})") from None
    adapters = {}
    for name, (found, layer) in layers.items():
        info = config["layers"][name]
        U, Vh = tensors[f"{name}.U"], tensors[f"{name}.Vh"]
        if info["kind"] == "conv2d":
            adapter = SEMUConv2d(layer, U, Vh, info.get("ranks"))
        elif info["kind"] == "column_linear":
            adapter = SEMUColumnLinear(layer, U, Vh, info["ranks"])
        else:
            adapter = (SEMUConv1D if info["kind"] == "conv1d" else SEMULinear)(layer, U, Vh)
        R = tensors[f"{name}.R"]
        if R.dtype != adapter.R.dtype:  # saved after semu_model.double() (or .half()): back in that dtype
            device = adapter.R.device
            adapter.U, adapter.Vh = U.to(device).contiguous(), Vh.to(device).contiguous()
            adapter.R = nn.Parameter(torch.empty_like(R, device=device))
        with torch.no_grad():
            adapter.R.copy_(R)
        adapters[found] = adapter
    return SEMUModel(model, adapters, semu_config, report)
