"""Which layers SEMU changes: every nn.Linear, nn.Conv2d and transformers Conv1D by default, narrowed by name
patterns."""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch.nn as nn

from .adapters import SEMUAdapter
from .config import SEMUConfig

# Layers with a weight that SEMU cannot adapt; naming one explicitly is an error, otherwise they are skipped.
_UNSUPPORTED = (nn.Embedding, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.EmbeddingBag)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2-style models): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


# Subclasses that override forward with the plain op's computation (read in their code): adapted as their base.
_PLAIN_FORWARD = {"transformers.models.falcon.modeling_falcon.FalconLinear"}
_PLAIN_WITHOUT_LORA = {"diffusers.models.lora.LoRACompatibleLinear", "diffusers.models.lora.LoRACompatibleConv"}


def unsupported_reason(module: nn.Module, custom_forward_ok: bool = False) -> str:
    """"" when SEMU can adapt module, else why not. custom_forward_ok: a Linear/Conv2d whose class overrides forward
    counts as adaptable (target_modules named it: select_layers warns)."""
    if is_conv1d(module):
        return ""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads out_proj.weight directly, so an adapter there would be bypassed"
    if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module._parameters.get("weight"), nn.Parameter):
        return ("its weight is computed from other tensors (weight_norm, spectral_norm or a parametrization): "
                "gradients reach those, not the weight SEMU adapts")
    if not custom_forward_ok and custom_forward(module):
        base = "nn.Linear" if isinstance(module, nn.Linear) else "nn.Conv2d"
        return (f"{type(module).__name__} overrides {base}'s forward, which an adapter (W + U R V^T through the plain "
                f"op) would bypass; name it in target_modules to adapt it anyway")
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, nn.Conv2d):
        return "" if module.groups == 1 else f"grouped Conv2d (groups={module.groups}) is not supported"
    if isinstance(module, _UNSUPPORTED):
        return f"{type(module).__name__} is not supported (only nn.Linear and nn.Conv2d)"
    return "not a layer"


def custom_forward(module: nn.Module) -> bool:
    """A Linear / Conv2d whose class computes its output otherwise than nn.Linear / nn.Conv2d do (a forward of its
    own), but for the subclasses known to compute the plain op."""
    cls = type(module)
    if isinstance(module, nn.Linear) and not is_conv1d(module):
        overridden = cls.forward is not nn.Linear.forward
    elif isinstance(module, nn.Conv2d):
        overridden = cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
    else:
        return False
    name = f"{cls.__module__}.{cls.__qualname__}"
    plain = name in _PLAIN_FORWARD or (name in _PLAIN_WITHOUT_LORA and getattr(module, "lora_layer", None) is None)
    return overridden and not plain


def describe_names(names) -> str:
    """The names for an error message: all of them when few, else their kinds with block indices as N
    ("model.layers.N.mlp.down_proj"), so that an LLM's hundreds of layers stay readable."""
    names = list(names)
    if len(names) <= 20:
        return ", ".join(names) or "(none)"
    kinds = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name) for name in names})
    return f"{len(names)} layers of {len(kinds)} kinds: {', '.join(kinds)}"


def select_layers(model: nn.Module, config: SEMUConfig) -> dict[str, nn.Module]:
    """{qualified name: module} for the layers to adapt, in model order. Raises ValueError, naming the pattern and
    the candidates, for a pattern that matches nothing, an explicitly named unsupported layer, or an empty choice."""
    if any(isinstance(m, SEMUAdapter) for m in model.modules()):
        raise ValueError("model already holds SEMU adapters; call unload() or merge_and_unload() first")
    named = [(name, m) for name, m in model.named_modules() if name]
    supported = {name: m for name, m in named if not unsupported_reason(m)}
    weighted = _UNSUPPORTED + (nn.Linear, nn.Conv2d)
    with_weights = {name: m for name, m in named if isinstance(m, weighted) or is_conv1d(m)}
    candidates = describe_names(supported)

    def matches(patterns, pool):
        for pattern in patterns:
            if not any(re.search(pattern, name) for name in pool):
                raise ValueError(f"pattern {pattern!r} matches no layer; candidates: {candidates}")
        return {name for name in pool if any(re.search(p, name) for p in patterns)}

    chosen = dict(supported)
    if config.target_modules is not None:
        hit = matches(config.target_modules, with_weights)
        for name in sorted(hit):
            reason = unsupported_reason(with_weights[name], custom_forward_ok=True)
            if reason:
                raise ValueError(f"target_modules selects {name!r}, which SEMU cannot adapt: {reason}")
        chosen = {name: m for name, m in with_weights.items() if name in hit}
    excluded = matches(config.exclude_modules, with_weights) if config.exclude_modules is not None else set()
    chosen = {name: m for name, m in chosen.items() if name not in excluded}
    custom = [name for name, m in with_weights.items() if custom_forward(m) and name not in excluded]
    if config.target_modules is None and custom:  # skipped like other unsupported layers, but less expected
        warnings.warn(f"skipping layers whose class overrides forward (an adapter would bypass it; name them in "
                      f"target_modules to adapt them anyway): {describe_names(custom)}", stacklevel=3)
    forced = [name for name in chosen if custom_forward(chosen[name])]
    if forced:
        warnings.warn(f"adapting {describe_names(forced)} as target_modules names them, although their class "
                      f"overrides forward: the adapted layer computes the plain op with W + U R V^T, not that "
                      f"forward", stacklevel=3)
    if not chosen:
        raise ValueError(f"no layer left to adapt after target_modules/exclude_modules; candidates: {candidates}")
    if config.gamma_overrides:
        matches(list(config.gamma_overrides), chosen)  # a gamma_overrides pattern must pick a layer, as targets do
    check_shared_weights(model, chosen)
    return chosen


def skipped_layers(model: nn.Module, config: SEMUConfig) -> dict[str, str]:
    """{name: why} for the layers with a weight that the config's patterns would cover but SEMU cannot adapt
    (grouped convs, nn.MultiheadAttention's out_proj, embeddings, other conv kinds): the report lists them."""
    out = {}
    for name, module in model.named_modules():
        reason = unsupported_reason(module) if name else ""
        if not reason or reason == "not a layer":
            continue
        if config.target_modules is not None and not any(re.search(p, name) for p in config.target_modules):
            continue
        if config.exclude_modules is not None and any(re.search(p, name) for p in config.exclude_modules):
            continue
        out[name] = reason
    return out


def parameter_owners(model: nn.Module) -> dict[int, list]:
    """{id(parameter): the names of every module using it (a weight's module name, another parameter's full
    name)}: a parameter with more than one owner is shared (tied)."""
    owners: dict[int, list] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0] if name.endswith(".weight") else name)
    return owners


def check_shared_weights(model: nn.Module, chosen: dict, remedy: Optional[str] = None) -> None:
    """Two adapted layers on one weight tensor cannot both be merged and unmerged exactly: refuse (remedy: what to
    do instead; default: exclude one of them). A weight shared with a module SEMU does not adapt (an LM head tied
    to the embeddings) is fine until merged: warn."""
    owners = parameter_owners(model)
    names: dict[int, set] = {}  # a layer's names: one module registered under several is one layer, one adapter
    for module_name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), set()).add(module_name)
    for name, layer in chosen.items():
        sharing = [o for o in owners.get(id(layer.weight), []) if o != name and o not in names[id(layer)]]
        adapted = [o for o in sharing if o in chosen]
        if adapted:
            pattern = f"^{re.escape(adapted[0])}$"
            raise ValueError(f"layers {name!r} and {adapted[0]!r} share one weight tensor, and SEMU adapts each "
                             f"weight once: " + (remedy or f"keep one of them (exclude_modules=[{pattern!r}]), or "
                                                           f"untie the weights first"))
        if sharing:
            warnings.warn(f"{name}.weight is shared with {', '.join(sharing)}: the adapter acts on {name} only, but "
                          f"merge_adapters()/merge_and_unload() would write into the shared tensor and change those "
                          f"too; keep the adapters unmerged (or export them as LoRA) for an exact original elsewhere")
