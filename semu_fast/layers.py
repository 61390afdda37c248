"""Which layers SEMU changes: every nn.Linear and nn.Conv2d by default, narrowed by name patterns."""
from __future__ import annotations

import re

import torch.nn as nn

from .adapters import SEMUAdapter
from .config import SEMUConfig

# Layers with a weight that SEMU cannot adapt; naming one explicitly is an error, otherwise they are skipped.
_UNSUPPORTED = (nn.Embedding, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.EmbeddingBag)


def unsupported_reason(module: nn.Module) -> str:
    """"" when SEMU can adapt module, else why not."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads out_proj.weight directly, so an adapter there would be bypassed"
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, nn.Conv2d):
        return "" if module.groups == 1 else f"grouped Conv2d (groups={module.groups}) is not supported"
    if isinstance(module, _UNSUPPORTED):
        return f"{type(module).__name__} is not supported (only nn.Linear and nn.Conv2d)"
    return "not a layer"


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
    with_weights = {name: m for name, m in named if isinstance(m, _UNSUPPORTED + (nn.Linear, nn.Conv2d))}
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
            reason = unsupported_reason(with_weights[name])
            if reason:
                raise ValueError(f"target_modules selects {name!r}, which SEMU cannot adapt: {reason}")
        chosen = {name: m for name, m in supported.items() if name in hit}
    if config.exclude_modules is not None:
        excluded = matches(config.exclude_modules, with_weights)
        chosen = {name: m for name, m in chosen.items() if name not in excluded}
    if not chosen:
        raise ValueError(f"no layer left to adapt after target_modules/exclude_modules; candidates: {candidates}")
    return chosen
