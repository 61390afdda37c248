"""sf.prepare: forget-set gradients -> perpendicular projection -> truncated SVD -> adapters installed."""
from __future__ import annotations

import contextlib
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.nn as nn

from . import distributed as distributed_setup
from . import ops
from ._checks import check_callable
from ._profile import annotate
from ._utils import length_or_none, set_torch_rng_state, torch_rng_state
from .adapters import SEMUAdapter, SEMUColumnLinear, SEMUConv1D, SEMUConv2d, SEMULinear
from .config import SEMUConfig
from .gradients import NORM_TYPES, LossFn, accumulate_gradients
from .layers import describe_names, is_conv1d, select_layers, skipped_layers
from .model import SEMUModel
from .ops.svd import conv_gradient_matrices
from .report import LayerReport, SEMUReport


@contextlib.contextmanager
def _phase(name: str, timings: dict, device: torch.device):
    """Time one phase of prepare into timings[name] (the device synchronised at its end) and mark it for NVTX."""
    start = time.perf_counter()
    with annotate(f"semu_fast.prepare.{name}"):
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _accumulator_groups(layers: dict, budget: Optional[int]) -> list[dict]:
    """The layers in model order, cut into groups whose float32 gradient accumulators fit `budget` bytes together
    (one group without a budget). Each group costs a whole forget pass: the budget trades compute for memory."""
    if budget is None:
        return [layers]
    parts, current, used = [], {}, 0
    for name, layer in layers.items():
        size = layer.weight.numel() * 4
        if size > budget:
            raise ValueError(f"max_accumulator_bytes={budget} cannot hold the float32 gradient of layer {name!r} "
                             f"({size} bytes); raise it to at least that, or exclude the layer")
        if used + size > budget:
            parts.append(current)
            current, used = {}, 0
        current[name] = layer
        used += size
    return parts + [current]


class _Rewind:
    """The model's buffers (norm statistics move under norm_mode="train"), torch's random state (dropout) and the
    forget loader's shuffling generators as they were before the first of several forget passes, put back before
    each later one and after a failed one; with norm_mode other than "train", the buffers also after a pass that
    succeeded (a train-mode spectral norm's power iteration moves its own). (A loss function that keeps its own
    generator, as the diffusion losses do, still draws afresh in every pass.)"""

    def __init__(self, model: nn.Module, loader, buffers: bool = True):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
        self.rng = torch_rng_state()
        self.shufflers = [(g, g.get_state()) for g in loader_generators(loader)]

    def __call__(self) -> None:
        self.restore_buffers()
        set_torch_rng_state(self.rng)
        for generator, state in self.shufflers:
            generator.set_state(state)

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):  # (an expanded buffer cannot be written, nor needs to be)
                    buffer.copy_(saved)


def _loader_parts(loader) -> list:
    """A DataLoader, its sampler and its batch sampler's sampler (what may hold a shuffle's state)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return [loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)]


def loader_generators(*loaders) -> list:
    """The torch.Generators that shuffle these DataLoaders (the loader's own and its sampler's), each once."""
    found = {}
    for owner in (part for loader in loaders for part in _loader_parts(loader)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            found[id(generator)] = generator
    return list(found.values())


def set_sampler_epoch(loaders, epoch: int) -> None:
    """set_epoch(epoch) on the loaders' samplers that have it (a DistributedSampler shuffles alike every epoch
    without it), as a training loop calls it."""
    samplers = {id(part): part for loader in loaders if loader is not None
                for part in [*_loader_parts(loader)[1:], getattr(loader, "batch_sampler", None)]
                if callable(getattr(part, "set_epoch", None))}
    for sampler in samplers.values():
        sampler.set_epoch(epoch)


def check_loader(name: str, loader, passes: int = 1, empty: bool = False) -> None:
    """A loader of batches that can be read `passes` times: not None, iterable, not empty when its length is known
    (unless `empty`: a rank's shard, which the ranks' sums check together), and not a one-shot iterator when read
    more than once."""
    if loader is None or isinstance(loader, (torch.Tensor, str, bytes, dict)) or not isinstance(loader, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (a list or a DataLoader), got "
                        f"{type(loader).__name__}")
    if passes > 1 and isinstance(loader, Iterator):  # not iter(loader): that would draw from a DataLoader's sampler
        raise ValueError(f"{name} is a one-shot iterator, but it is read {passes} or more times (the gradient pass, "
                         f"then every epoch); pass a list or a DataLoader")
    if length_or_none(loader) == 0 and not empty:
        raise ValueError(f"{name} is empty: give at least one batch")


def _check_model_and_mode(layers: dict) -> None:
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("prepare computes gradients, but it was called with grad mode off (inside torch.no_grad() "
                           "or torch.inference_mode()); call it outside that block")
    meta = [name for name, layer in layers.items() if layer.weight.is_meta]
    if meta:
        raise ValueError(f"layer(s) {', '.join(meta[:5])} hold their weights on the meta device (no values yet): load "
                         f"the weights (load_state_dict(..., assign=True), from_pretrained) before prepare")


def per_column_layers(layers: dict, config: SEMUConfig) -> set[str]:
    """The selected layers that take the per-column layout (config.per_column_modules). Each pattern must match a
    selected layer, and every layer it matches must be an nn.Linear."""
    chosen = set()
    for pattern in config.per_column_modules or ():
        hits = [name for name in layers if re.search(pattern, name)]
        if not hits:
            raise ValueError(f"per_column_modules pattern {pattern!r} matches no selected layer; selected: "
                             f"{describe_names(layers)}")
        for name in hits:
            layer = layers[name]
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"per_column_modules selects {name!r}, a {type(layer).__name__}: only nn.Linear "
                                 f"layers take the per-column layout (a Conv2d is split per input channel already: "
                                 f"conv_rank='per_channel')")
        chosen.update(hits)
    return chosen


def _project(grads: dict, layers: dict, mine: list, projection: str) -> None:
    """Project the gradients of the layers this rank owns, in place. FSDP2: each weight is gathered whole (every
    rank takes part, layer by layer, in model order) and kept only by its owner."""
    weights = {}
    for name, layer in layers.items():
        weight = distributed_setup.full_tensor(layer.weight.detach())
        if name in mine:
            weights[name] = weight
    by_device: dict[torch.device, list] = {}
    for name in mine:  # the kernels take one device per call (a model may be split over several GPUs)
        by_device.setdefault(grads[name].device, []).append(name)
    for names in by_device.values():
        ops.project_perpendicular_([grads[n] for n in names], [weights[n] for n in names], projection)


def _layer_seed(seed: int, name: str) -> int:
    """Each layer's own random stream: its factors do not depend on which layers ran before it (or on which rank)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 62


def _layer_kind(layer: nn.Module, per_column: bool) -> str:
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    return "conv1d" if is_conv1d(layer) else "column_linear" if per_column else "linear"


def _complete_columns(U: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """conv_rank="max": every channel's adapter spans k_max directions, as an exact SVD's null-space columns make it
    do (the official code's); the Gram route returns zero U columns past a channel's rank instead (a dead channel's
    R would not train, though the report counts it). Those channels' zero columns become Gaussian ones, and one
    batched QR makes them orthonormal to the channel's others (which it keeps, up to the sign it restores)."""
    zero = U.square().sum(-2) == 0  # (channels, k); a channel's zero columns trail its nonzero ones
    channels = zero.any(-1).nonzero().flatten()
    if len(channels) == 0:
        return U
    part = U[channels]
    noise = torch.randn(part.shape, generator=generator, device=U.device, dtype=U.dtype)
    Q, R = torch.linalg.qr(torch.where(zero[channels][:, None, :], noise, part))
    U = U.clone()
    U[channels] = Q * torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)[:, None, :]
    return U


def _layer_factors(name: str, layer: nn.Module, G: torch.Tensor, config: SEMUConfig, per_column: bool,
                   rows: Optional[int] = None) -> dict:
    """Truncated SVD of one layer's projected gradient G: U, Vh, k, per-channel ranks and captured variance. rows:
    the input rows the layer saw in the gradient pass (its rank bound, for a Linear or Conv1D)."""
    gamma = config.gamma_for(name)
    kind = _layer_kind(layer, per_column)
    batched = kind in ("conv2d", "column_linear")  # one matrix per input channel (column)
    if kind == "column_linear":  # the (out, in) gradient as a 1x1 conv's: `in` matrices of out x 1
        G = G[:, :, None, None]
    matrices = conv_gradient_matrices(G) if batched else G.T if kind == "conv1d" else G  # Conv1D: (in, out)
    method = "exact" if batched and config.svd == "randomized" else config.svd  # a batch of small SVDs
    generator = torch.Generator(device=G.device).manual_seed(_layer_seed(config.seed, name))
    result = ops.truncated_svd(matrices, gamma, config.rank_rule, method=method, generator=generator,
                               min_rank=config.min_rank, rank_hint=None if batched else rows or None)
    U, S, Vh = result
    spans_k_max = kind == "conv2d" and config.conv_rank == "max"  # every channel's adapter: k_max directions
    if spans_k_max:
        U = _complete_columns(U, generator)
    total = float(result.total_energy.sum())
    kept = S.double().square().sum() if spans_k_max else result.captured_energy.sum()
    captured = float(kept) / total if total > 0 else 1.0
    spectrum = S.double().square().sum(0).sqrt() if batched else S.double()
    return {"U": U, "Vh": Vh, "captured": captured, "ranks": result.ranks.tolist() if batched else None,
            "singular_values": spectrum.tolist(), "total_energy": total, "kind": kind}


def _project_and_factor(grads, layers: dict, mine: set, columns: set, config: SEMUConfig, timings: dict) -> dict:
    """The factors of each layer in `layers` this rank owns (None for the others) from its accumulated gradient."""
    device = layers[next(iter(layers))].weight.device
    with _phase("projection", timings, device):
        _project(grads, layers, [n for n in layers if n in mine], config.projection)
    with _phase("svd", timings, device):  # each gradient is freed as soon as its factors exist
        return {n: _layer_factors(n, layers[n], grads.pop(n), config, n in columns, grads.rows.get(n))
                if n in mine else None for n in layers}


def _install(name: str, layer: nn.Module, factors: dict, config: SEMUConfig):
    """(adapter or None, LayerReport) for one layer from its factors."""
    U, Vh, ranks, captured = factors["U"], factors["Vh"], factors["ranks"], factors["captured"]
    spectrum = {"singular_values": factors["singular_values"], "total_energy": factors["total_energy"]}
    k = U.shape[-1]
    gamma = config.gamma_for(name)
    kind = factors["kind"]
    if k == 0:
        note = ("zero gradient: no adapter" if factors["total_energy"] == 0 else
                f"k = 0 (rank_rule='official' with min_rank=0: the first direction explains more than gamma "
                f"{gamma:g}{' in every channel' if ranks is not None else ''}): no adapter")
        report = LayerReport(name, kind, tuple(layer.weight.shape), gamma, 0, captured, 0, ranks, note=note,
                             **spectrum)
        return None, report
    if kind == "conv2d":
        adapter = SEMUConv2d(layer, U, Vh, ranks if config.conv_rank == "per_channel" else None)
    elif kind == "column_linear":
        adapter = SEMUColumnLinear(layer, U, Vh, ranks)
    else:
        adapter = (SEMUConv1D if kind == "conv1d" else SEMULinear)(layer, U, Vh)
    report = LayerReport(name, kind, tuple(layer.weight.shape), gamma, k, captured, adapter.trainable_params(), ranks,
                         **spectrum)
    return adapter, report


def prepare(model: nn.Module, forget_loader: Iterable, loss_fn: Optional[LossFn] = None,
            config: Optional[SEMUConfig] = None, *, distributed: Optional[bool] = None,
            process_group=None) -> SEMUModel:
    """Install SEMU adapters on `model` (in place) from the gradients of `loss_fn` over `forget_loader`.

    loss_fn(model, batch) -> scalar; None means cross-entropy on (inputs, targets) batches. Base weights are never
    written; every check runs before the model is changed, and a pass that fails puts back the norm statistics
    (norm_mode="train") and random state it moved; with another norm_mode no buffer moves (those a train-mode
    module moved are put back after the pass). Returns a SEMUModel whose .report lists per layer the
    shape, rank k, captured variance and trainable parameters, the totals and the time of each phase. With
    config.max_accumulator_bytes the layers are split into groups whose float32 gradients fit that budget, and the
    forget data is passed once per group (the model stays unchanged until every group's factors exist).

    distributed: None (default) runs on torch.distributed when it is initialised with several processes, True
    requires it, False never uses it. Then each rank passes its own shard of the forget data, the gradients are
    summed across ranks, each rank computes the SVDs of the layers it owns and all ranks end with the same
    adapters (semu_fast.distributed). A DistributedDataParallel model is unwrapped: the adapters go into .module."""
    config = config if config is not None else SEMUConfig()
    if not isinstance(config, SEMUConfig):
        raise TypeError(f"config must be a SEMUConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_callable("loss_fn", loss_fn, "(model, batch) -> scalar")
    group = distributed_setup.resolve(distributed, process_group)
    model = distributed_setup.unwrap(model)
    layers = select_layers(model, config)
    columns = per_column_layers(layers, config)
    distributed_setup.check_fsdp_units(layers)
    _check_model_and_mode(layers)
    device = layers[next(iter(layers))].weight.device
    parts = _accumulator_groups(layers, config.max_accumulator_bytes)
    if config.grad_clip is not None and len(parts) > 1:
        raise ValueError(f"grad_clip clips each batch's gradient over every layer at once, but max_accumulator_bytes="
                         f"{config.max_accumulator_bytes} splits the layers into {len(parts)} passes: raise the "
                         f"budget or leave grad_clip None")
    check_loader("forget_loader", forget_loader, passes=len(parts), empty=group is not None)
    # Each layer's SVD runs on one rank (all on this one without torch.distributed); only those are projected.
    owners = (distributed_setup.assign_owners({n: tuple(m.weight.shape) for n, m in layers.items()}, group.size)
              if group is not None else dict.fromkeys(layers, 0))
    mine = {n for n in layers if owners[n] == (group.rank if group is not None else 0)}
    timings, factors = {}, {}
    # Only norm_mode="train" may move buffers (the norm statistics), and a pass that fails (a bad batch, NaN) leaves
    # them as they were; other modules' buffers (spectral norm's power iteration in a train-mode model) stay. Only
    # a module in training mode moves buffers: an eval-mode model needs no copy of them.
    moving = config.norm_mode == "train" or len(parts) > 1 or (config.norm_mode == "eval" and any(
        m.training for m in model.modules() if not isinstance(m, NORM_TYPES)))
    rewind = _Rewind(model, forget_loader, buffers=moving)
    try:
        for i, part in enumerate(parts):  # one forget pass per group of layers whose float32 gradients fit the budget
            if i:
                rewind()  # every pass starts from the same statistics and random state, as one pass would
            with _phase("gradients", timings, device):
                grads = accumulate_gradients(model, forget_loader, part, loss_fn, config.norm_mode, group,
                                             config.grad_clip)
            # an owner's failure (out of memory in its SVD, say) is raised on every rank, none left waiting
            part_factors, failure = distributed_setup.attempt(
                lambda: _project_and_factor(grads, part, mine, columns, config, timings), group)
            factors.update(part_factors or {})
            if group is not None:
                distributed_setup.all_reduce_outcome_([], group, failure, "in the projection or SVD phase", device)
    except BaseException:
        rewind()
        raise
    if config.norm_mode != "train":
        rewind.restore_buffers()
    with _phase("svd", timings, device):
        if group is not None:
            factors = distributed_setup.broadcast_factors(factors, owners, group, device)
        report = SEMUReport(total_params=sum(p.numel() for p in model.parameters()),
                            skipped=skipped_layers(model, config))
        adapters: dict[str, SEMUAdapter] = {}
        for name in layers:
            adapter, layer_report = _install(name, layers[name], factors.pop(name), config)
            report.layers.append(layer_report)
            if adapter is not None:
                adapters[name] = adapter
    with _phase("install", timings, device):
        semu_model = SEMUModel(model, adapters, config, report)
    report.gradient_passes = len(parts)
    report.timings = timings
    return semu_model
