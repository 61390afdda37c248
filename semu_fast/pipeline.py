"""sf.prepare: forget-set gradients -> perpendicular projection -> truncated SVD -> adapters installed."""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn as nn

from . import ops
from .adapters import SEMUAdapter, SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .gradients import LossFn, accumulate_gradients
from .layers import select_layers
from .model import SEMUModel
from .reference import conv_gradient_matrices
from .report import LayerReport, SEMUReport


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_svd(name: str, layer: nn.Module, G: torch.Tensor, config: SEMUConfig, generator: torch.Generator):
    """(adapter or None, LayerReport) for one layer from its projected gradient G."""
    gamma = config.gamma_for(name)
    is_conv = isinstance(layer, nn.Conv2d)
    matrices = conv_gradient_matrices(G) if is_conv else G
    method = "exact" if is_conv and config.svd == "randomized" else config.svd  # conv: a batch of small SVDs
    result = ops.truncated_svd(matrices, gamma, config.rank_rule, method=method, generator=generator)
    U, _, Vh = result
    total = float(result.total_energy.sum())
    captured = float(result.captured_energy.sum()) / total if total > 0 else 1.0
    k = U.shape[-1]
    ranks = result.ranks.tolist() if is_conv else None
    kind = "conv2d" if is_conv else "linear"
    if k == 0:
        report = LayerReport(name, kind, tuple(layer.weight.shape), gamma, 0, captured, 0, ranks,
                             note="zero gradient: no adapter")
        return None, report
    if is_conv:
        adapter = SEMUConv2d(layer, U, Vh, ranks if config.conv_rank == "per_channel" else None)
    else:
        adapter = SEMULinear(layer, U, Vh)
    report = LayerReport(name, kind, tuple(layer.weight.shape), gamma, k, captured, adapter.trainable_params(), ranks)
    return adapter, report


def prepare(model: nn.Module, forget_loader: Iterable, loss_fn: Optional[LossFn] = None,
            config: Optional[SEMUConfig] = None) -> SEMUModel:
    """Install SEMU adapters on `model` (in place) from the gradients of `loss_fn` over `forget_loader`.

    loss_fn(model, batch) -> scalar; None means cross-entropy on (inputs, targets) batches. Base weights are never
    written; every check runs before the model is changed. Returns a SEMUModel whose .report lists per layer the
    shape, rank k, captured variance and trainable parameters, the totals and the time of each phase."""
    config = config if config is not None else SEMUConfig()
    if not isinstance(config, SEMUConfig):
        raise TypeError(f"config must be a SEMUConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = select_layers(model, config)
    device = layers[next(iter(layers))].weight.device
    timings = {}

    start = time.perf_counter()
    grads = accumulate_gradients(model, forget_loader, {n: m.weight for n, m in layers.items()}, loss_fn,
                                 config.norm_mode)
    _sync(device)
    timings["gradients"] = time.perf_counter() - start

    start = time.perf_counter()
    names = list(grads)
    projected = [grads.pop(n) for n in names]  # the fp32 accumulators, projected in place
    ops.project_perpendicular_(projected, [layers[n].weight.detach() for n in names], config.projection)
    _sync(device)
    timings["projection"] = time.perf_counter() - start

    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    adapters: dict[str, SEMUAdapter] = {}
    report = SEMUReport(total_params=sum(p.numel() for p in model.parameters()))
    for name, G in zip(names, projected):
        adapter, layer_report = _layer_svd(name, layers[name], G, config, generator)
        report.layers.append(layer_report)
        if adapter is not None:
            adapters[name] = adapter
    del projected
    _sync(device)
    timings["svd"] = time.perf_counter() - start

    start = time.perf_counter()
    semu_model = SEMUModel(model, adapters, config, report)
    timings["install"] = time.perf_counter() - start
    report.timings = timings
    return semu_model
