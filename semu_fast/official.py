"""Checkpoints of the official SEMU code (github gmum/semu) to our adapters and back.

The official code swaps each adapted layer for a CustomLinear / CustomConv2d whose state holds `weight` (R: k x k,
or in x k x k for conv), `a` (the original weight), `u`, `vh` (U and Vh: out x k and k x in; conv in x out x k and
in x k x kh*kw), `bias`, and in the DDPM/SD code `n_imp_comps` (the kept ranks: a scalar per Linear, one per input
channel for conv), where U, Vh and R are kept whole and a gradient mask keeps R inside the leading k x k block.

    semu_model = load_official(model, "unlearn/own_SVDcheckpoint.pth.tar")   # their model state, our adapters
    torch.save({"state_dict": official_state_dict(semu_model)}, "to_official.pth.tar")

`model` is the architecture the checkpoint was made from, with plain Linear / Conv2d layers of the same names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .adapters import SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .layers import check_shared_weights
from .model import SEMUModel, check_finite_adapters, check_plain_model
from .report import LayerReport, SEMUReport

_PARTS = ("weight", "a", "u", "vh")


def _read_state(state: Union[dict, list, str, Path]) -> dict:
    """The model state of an official checkpoint: a state dict, {"state_dict": ...} (classification), the DDPM
    semu_unlearn file's list [state dict, optimizer, step, (ema)], or a path to any of them."""
    if isinstance(state, (str, Path)):
        if Path(state).is_dir():
            raise ValueError(f"state: {state} is a folder; official checkpoints are files (.pth, .pth.tar). A SEMU "
                             f"adapter folder loads with sf.load_adapters, a peft LoRA folder with peft")
        state = torch.load(state, map_location="cpu", weights_only=True)
    if isinstance(state, (list, tuple)) and state and isinstance(state[0], dict):
        state = state[0]  # the official DDPM's [model state, optimizer state, step, (ema state)]
    if not isinstance(state, dict):
        raise ValueError(f"state must be a state dict, a checkpoint dict, the official DDPM's checkpoint list or a "
                         f"path to one, got {type(state).__name__}")
    state = state.get("state_dict", state)
    if not isinstance(state, dict):
        raise ValueError(f"state['state_dict'] must be a state dict, got {type(state).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _official_layers(state: dict) -> list[str]:
    """Names of the layers the checkpoint holds SEMU factors for: two of .a, .u, .vh (one alone may be another
    module's parameter of that name), and then all of _PARTS."""
    parts = {}
    for key in state:
        name, _, part = key.rpartition(".")
        if name and part in ("a", "u", "vh"):
            parts[name] = parts.get(name, 0) + 1
    names = [name for name, count in parts.items() if count >= 2]
    for name in names:
        missing = [f"{name}.{part}" for part in _PARTS if f"{name}.{part}" not in state]
        if missing:
            raise ValueError(f"the checkpoint holds part of official layer {name!r} but not {', '.join(missing)} "
                             f"(an official layer has {', '.join(_PARTS)})")
    return names


def _check_shapes(name: str, layer: nn.Module, state: dict) -> None:
    """Each official factor's shape for this layer: Linear R (q, q), u (out, q), vh (q, in); Conv2d R (in, q, q), u
    (in, out, q), vh (in, q, kh*kw); bias (out,); n_imp_comps within [0, q], one per input channel for a conv."""
    R, U, Vh = (state[f"{name}.{p}"] for p in ("weight", "u", "vh"))
    out, cin = layer.weight.shape[:2]
    q = R.shape[-1] if R.dim() else 0
    if isinstance(layer, nn.Conv2d):
        area = layer.weight.shape[2] * layer.weight.shape[3]
        expected = {"weight": (cin, q, q), "u": (cin, out, q), "vh": (cin, q, area)}
    else:
        expected = {"weight": (q, q), "u": (out, q), "vh": (q, cin)}
    if layer.bias is not None and f"{name}.bias" in state:
        expected["bias"] = (out,)
    for part, shape in expected.items():
        got = tuple(state[f"{name}.{part}"].shape)
        if got != shape:
            raise ValueError(f"{name}.{part} has shape {got}; layer {name!r} ({type(layer).__name__} "
                             f"{tuple(layer.weight.shape)}) needs {shape}")
    counts = state.get(f"{name}.n_imp_comps")
    if counts is not None:
        counts = torch.as_tensor(counts).reshape(-1)
        if isinstance(layer, nn.Linear) and counts.numel() != 1:
            raise ValueError(f"{name}.n_imp_comps has {counts.numel()} entries; a Linear keeps one rank")
        if counts.numel() and not (0 <= int(counts.min()) and int(counts.max()) <= q):
            raise ValueError(f"{name}.n_imp_comps must be within [0, {q}] (the factors' width), got "
                             f"{counts.tolist()}")


def _ranks(state: dict, name: str, layer: nn.Module, R: torch.Tensor) -> tuple[int, Optional[list]]:
    """(k, per-channel ranks or None): from n_imp_comps when present (DDPM/SD: factors kept whole), else R's size."""
    counts = state.get(f"{name}.n_imp_comps")
    if counts is None:
        return R.shape[-1], None
    counts = torch.as_tensor(counts).reshape(-1).long()
    if isinstance(layer, nn.Linear):
        return int(counts.max()), None
    if len(counts) != R.shape[0]:
        raise ValueError(f"{name}.n_imp_comps has {len(counts)} entries for {R.shape[0]} input channels")
    return int(counts.max()), counts.tolist()


def _check_outside_block(name: str, R: torch.Tensor, k: int, ranks: Optional[list]) -> None:
    """The official forward uses the whole R: entries outside the kept block must be zero for our truncated
    adapter to give the same outputs."""
    limits = torch.as_tensor(ranks if ranks is not None else [k], device=R.device).view(-1, 1, 1)
    rows = torch.arange(R.shape[-1], device=R.device)
    inside = (rows.view(1, -1, 1) < limits) & (rows.view(1, 1, -1) < limits)
    if (R.reshape(-1, *R.shape[-2:]) * ~inside).abs().max() > 0:
        raise ValueError(f"{name}.weight (R) has nonzero entries outside the leading block of the kept ranks "
                         f"(n_imp_comps): that checkpoint did not train with the official gradient mask")


def load_official(model: nn.Module, state, *, config: Optional[SEMUConfig] = None,
                  load_base: bool = False) -> SEMUModel:
    """Our adapters from an official SEMU checkpoint (`state`: its state dict, the {"state_dict": ...} checkpoint or
    a path to it), installed on `model` (the same architecture, plain layers). Every layer the checkpoint adapts must
    be a Linear or Conv2d of `model` with the checkpoint's weight `a`; with load_base=True the checkpoint's `a` and
    bias are copied into `model` first (the only case where `model` changes besides the adapters). Layers with
    k = 0 get no adapter. config: the SEMUConfig to record (default: the official projection and rank rule).
    Everything is checked before `model` is touched. official -> ours -> official keeps the outputs but not every
    key: layers with k = 0 get no adapter (official_state_dict then writes them as plain layers), U, Vh and R are
    cut to k, and n_imp_comps is written only where the ranks differ per input channel."""
    check_plain_model(model)
    state = _read_state(state)
    names = _official_layers(state)
    if not names:
        raise ValueError("state holds no official SEMU layer (keys <layer>.weight, .a, .u and .vh)")
    plan = []
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint adapts layer {name!r}, which model does not have") from None
        if type(layer) not in (nn.Linear, nn.Conv2d):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; official checkpoints adapt nn.Linear and "
                             f"nn.Conv2d")
        a, R, U, Vh = (state[f"{name}.{p}"] for p in ("a", "weight", "u", "vh"))
        if a.shape != layer.weight.shape:
            raise ValueError(f"layer {name!r} has weight shape {tuple(layer.weight.shape)}, the checkpoint's is "
                             f"{tuple(a.shape)}")
        _check_shapes(name, layer, state)
        if not load_base and not torch.equal(a.to(layer.weight), layer.weight.detach()):
            raise ValueError(f"layer {name!r} holds other weights than the checkpoint's `a`: pass the model it was "
                             f"made from, or load_base=True to take the checkpoint's weights")
        parts = [("weight", R), ("u", U), ("vh", Vh), ("a", a)]
        if load_base and layer.bias is not None and f"{name}.bias" in state:  # copied into the model too
            parts.append(("bias", state[f"{name}.bias"]))
        for part, tensor in parts:
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{name}.{part} must be a finite float tensor")
        k, ranks = _ranks(state, name, layer, R)
        _check_outside_block(name, R, k, ranks)
        plan.append((name, layer, a, R[..., :k, :k], U[..., :k], Vh[..., :k, :], k, ranks))
    check_shared_weights(model, {p[0]: p[1] for p in plan if p[6] > 0},
                         remedy="load the checkpoint onto a model whose weights are untied, as in the official one")
    config = config if config is not None else SEMUConfig(projection="official", rank_rule="official",
                                                          conv_rank="max" if all(p[7] is None for p in plan)
                                                          else "per_channel")
    adapters, entries = {}, []
    for name, layer, a, R, U, Vh, k, ranks in plan:
        conv = isinstance(layer, nn.Conv2d)
        if k > 0:
            adapter = SEMUConv2d(layer, U, Vh, ranks) if conv else SEMULinear(layer, U, Vh)
            with torch.no_grad():
                adapter.R.copy_(R)
            adapters[name] = adapter
        entries.append(LayerReport(name=name, kind="conv2d" if conv else "linear", shape=tuple(a.shape),
                                   gamma=config.gamma_for(name), k=k, captured_variance=None,
                                   trainable_params=adapters[name].trainable_params() if k > 0 else 0, ranks=ranks,
                                   note="imported from an official SEMU checkpoint"))
    if load_base:  # last: every check passed and every adapter is built
        with torch.no_grad():
            for name, layer, a, *_ in plan:
                layer.weight.copy_(a)
                if layer.bias is not None and f"{name}.bias" in state:
                    layer.bias.copy_(state[f"{name}.bias"])
    report = SEMUReport(layers=entries, total_params=sum(p.numel() for p in model.parameters()))
    return SEMUModel(model, adapters, config, report)


def official_state_dict(semu_model: SEMUModel) -> dict:
    """The model's state dict in the official layout: each adapted layer as `weight` (R), `a`, `u`, `vh`, `bias`,
    plus `n_imp_comps` where ranks differ per input channel (the DDPM/SD form); every other entry as the model's."""
    if not isinstance(semu_model, SEMUModel):
        raise TypeError(f"semu_model must be a SEMUModel (what sf.prepare, sf.unlearn or load_official return), got "
                        f"{type(semu_model).__name__}")
    semu_model._attached("export to the official layout")
    state = {}
    adapters = semu_model.adapters
    check_finite_adapters(adapters, "export to the official layout")
    prefixes = {f"{name}.": adapter for name, adapter in adapters.items()}
    for key, value in semu_model.model.state_dict().items():
        if not any(key.startswith(prefix) for prefix in prefixes):
            state[key] = value.detach().clone()
    for name, adapter in adapters.items():
        if adapter.kind not in ("linear", "conv2d"):
            raise ValueError(f"layer {name!r} holds a {adapter.kind} adapter, which the official layout has no form "
                             f"for (it adapts nn.Linear and nn.Conv2d as a whole)")
    for name, adapter in adapters.items():
        base = adapter._original_weight if adapter.merged else adapter.base_layer.weight
        state[f"{name}.weight"] = adapter.R.detach().clone()
        state[f"{name}.a"] = base.detach().clone()
        state[f"{name}.u"], state[f"{name}.vh"] = adapter.U.clone(), adapter.Vh.clone()
        if adapter.base_layer.bias is not None:
            state[f"{name}.bias"] = adapter.base_layer.bias.detach().clone()
        if adapter.ranks is not None and len(set(adapter.ranks)) > 1:
            state[f"{name}.n_imp_comps"] = torch.tensor(adapter.ranks).view(-1, 1)
    return state
