"""SEMU on torch.distributed: a data-parallel forget pass and a layer-sharded SVD phase.

Each rank runs the forget pass over its own shard of the forget data; the float32 accumulators are then summed
across ranks in a few bucketed all-reduces (one per BUCKET_BYTES of gradient, not one per layer). The SVDs are split
by cost: every layer has an owner rank that computes its factors, and each rank broadcasts all its layers' U and Vh
in one call. Every rank ends with the same adapters as a single process over the whole forget set.

Works with any backend (gloo on CPU, nccl on GPU), with DistributedDataParallel-wrapped models (the pass runs on
.module, outside DDP's own gradient reduction) and with FSDP2 (`fully_shard`) models: FSDP2 reduce-scatters each
batch's gradient itself, so the sharded sums are gathered whole (DTensor.full_tensor, one layer at a time, every
rank in the same order) instead of all-reduced, and so are the weights for the projection. The adapters then wrap
the sharded layers: FSDP2 unshards a layer's weight when the unit that holds it runs, so a targeted layer must sit
inside a larger unit (shard the blocks, not the Linear itself). Merging into sharded weights is refused. FSDP1
(FullyShardedDataParallel) and other DTensor parameters (tensor parallelism) are refused."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ._utils import length_or_none

BUCKET_BYTES = 256 * 2 ** 20


@dataclass(frozen=True)
class Group:
    """The process group SEMU runs on (None: the default one), with this process's rank and the world size."""
    group: Optional[object]
    rank: int
    size: int


def resolve(distributed: Optional[bool], process_group=None) -> Optional[Group]:
    """The group to use, or None to run as one process. distributed=None: when torch.distributed is initialised
    with more than one process; True: it must be; False: never."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (auto), got {distributed!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise RuntimeError("distributed=True needs torch.distributed initialised (torch.distributed."
                           "init_process_group, or torchrun) before prepare/unlearn")
    if process_group is not None and (distributed is False or not initialised):
        raise ValueError("process_group was given, but " + ("distributed=False runs in one process: leave it out"
                         if distributed is False else "torch.distributed is not initialised"))
    if distributed is False or not initialised:
        return None
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:  # what dist.new_group gives ranks outside it
        raise ValueError("process_group does not hold this process: call prepare/unlearn only on its ranks")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (dist.new_group), got "
                        f"{type(process_group).__name__}")
    size = dist.get_world_size(process_group)
    if distributed is None and size == 1:
        return None
    return Group(process_group, dist.get_rank(process_group), size)


class RankFailed(RuntimeError):
    """Raised on every rank whose own part succeeded when another rank's failed (that one raises its own error), so
    that no rank waits forever in a later collective for a rank that has left."""


def attempt(fn, group: Optional[Group]) -> tuple:
    """(fn(), None). With a group, an exception of fn comes back as (None, error) instead of being raised: the next
    all_reduce_outcome_ raises it on every rank (raised here, the other ranks would wait there for this one)."""
    try:
        return fn(), None
    except Exception as err:
        if group is None:
            raise
        return None, err


def all_reduce_outcome_(tensors: list[torch.Tensor], group: Group, failure: Optional[Exception], where: str,
                        device: torch.device, counts=()) -> list[int]:
    """all_reduce_sum_(tensors) carrying each rank's outcome in the same collective: `failure` (this rank's
    exception, or None) and `counts` (small ints), summed over the ranks and returned. A failure anywhere raises on
    every rank: its own error where it happened, RankFailed (naming `where`) elsewhere."""
    status = torch.tensor([float(failure is not None), *map(float, counts)], device=device)
    all_reduce_sum_([*tensors, status], group)
    failed, *sums = (round(v) for v in status.tolist())
    if failure is not None:
        raise failure
    if failed:
        raise RankFailed(f"{failed} other rank(s) of {group.size} failed {where}; their own errors say why")
    return sums


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (the forget pass must not trigger DDP's per-batch gradient averaging), and the
    model inside nn.DataParallel or torch.compile's wrapper (so layer names carry no "module." / "_orig_mod."
    prefix and the adapters load on the plain model); an FSDP2 model as it is; FSDP1 and other sharded (DTensor)
    models are refused with what they need."""
    # torch.compile's wrapper exists only once torch._dynamo is imported (importing it here would cost seconds)
    dynamo = sys.modules.get("torch._dynamo")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            break
    fsdp1, fsdp2, dtensor = _sharding(model)
    if fsdp1 or (dtensor and not fsdp2):
        raise TypeError("this sharded model is not supported: SEMU takes plain, DDP-wrapped or FSDP2 (fully_shard) "
                        "models, not FSDP1's FullyShardedDataParallel or tensor-parallel DTensor parameters. Pass "
                        "the unwrapped model or shard it with fully_shard; see semu_fast/distributed.py")
    return model


def _sharding(model: nn.Module) -> tuple:
    """(holds FSDP1 wrappers, holds FSDP2 units, has DTensor parameters)."""
    if not any(name in sys.modules for name in ("torch.distributed.fsdp", "torch.distributed.tensor")):
        return False, False, False  # no sharded model exists before these are imported (they import sympy: ~1 s)
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False, False, False
    modules = list(model.modules())
    return (any(isinstance(m, FullyShardedDataParallel) for m in modules),
            any(isinstance(m, FSDPModule) for m in modules),
            any(isinstance(p, DTensor) for p in model.parameters()))


def is_sharded(tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded weight or gradient)."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor exists before it is imported
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tensor, DTensor)


def check_fsdp_units(layers: dict) -> None:
    """A targeted layer must not be an FSDP2 unit of its own: the adapter reads its weight directly, so the unit's
    own unshard hook would never run."""
    if "torch.distributed.fsdp" not in sys.modules:  # no FSDP2 unit exists before it is imported
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    own = [name for name, layer in layers.items() if isinstance(layer, FSDPModule)]
    if own:
        raise ValueError(f"layer(s) {', '.join(own)} are fully_shard units of their own; SEMU adapters need their "
                         f"weights unsharded by an enclosing unit: apply fully_shard to the blocks that hold them "
                         f"(or exclude them with exclude_modules)")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it, in the same order); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def all_reduce_sum_(tensors: list[torch.Tensor], group: Group) -> None:
    """tensors[i] = sum over ranks of tensors[i], in place, in buckets of at most BUCKET_BYTES per device and dtype
    (a rank's model may span several devices)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for same in groups.values():
        bucket, size = [], 0
        for t in same + [None]:
            if t is None or (bucket and size + t.numel() * t.element_size() > BUCKET_BYTES):
                if bucket:
                    flat = torch.cat([b.reshape(-1) for b in bucket])
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group.group)
                    offset = 0
                    for b in bucket:
                        b.copy_(flat[offset:offset + b.numel()].view_as(b))
                        offset += b.numel()
                bucket, size = [], 0
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()


def svd_cost(shape) -> float:
    """Relative cost of a layer's SVD: m n min(m, n) for a Linear, in * out * (kh*kw)^2 for a conv's batch."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return float(cin) * out * (kh * kw) ** 2
    m, n = shape
    return float(m) * n * min(m, n)


def assign_owners(shapes: dict[str, tuple], size: int) -> dict[str, int]:
    """Owner rank per layer: longest job first onto the least loaded rank (ties to the lower rank)."""
    load = [0.0] * size
    owners = {}
    for name in sorted(shapes, key=lambda n: (-svd_cost(shapes[n]), n)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += svd_cost(shapes[name])
    return owners


def check_same_lengths(loaders: dict, group: Group, why: str) -> None:
    """Every rank's loaders ({name: loader}) hold the same number of batches, where they have a length; `why` the
    ranks must (a ValueError on every rank otherwise)."""
    counts = all_gather_objects([length_or_none(loader) for loader in loaders.values()], group)
    for i, name in enumerate(loaders):
        known = [c[i] for c in counts if c[i] is not None]
        if len(set(known)) > 1:
            raise ValueError(f"{why}, so every rank must pass the same number of batches; the ranks' {name}s hold "
                             f"{[c[i] for c in counts]} (a DistributedSampler gives each rank the same number)")


def all_gather_objects(obj, group: Group) -> list:
    """Every rank's `obj` (picklable), indexed by rank, on every rank."""
    out = [None] * group.size
    dist.all_gather_object(out, obj, group=group.group)
    return out


def broadcast_factors(results: dict[str, Optional[dict]], owners: dict[str, int], group: Group,
                      device: torch.device) -> dict[str, dict]:
    """Every rank gets every layer's factors. results[name] is a dict with tensors "U", "Vh" (float32) and
    picklable metadata on the owner rank, None elsewhere. One object broadcast and one tensor broadcast per rank."""
    out = dict(results)
    global_ranks = (dist.get_process_group_ranks(group.group) if group.group is not None
                    else list(range(group.size)))
    for src in range(group.size):
        mine = [n for n in owners if owners[n] == src]
        meta = [{n: {k: v for k, v in results[n].items() if k not in ("U", "Vh")} | {
            "U_shape": tuple(results[n]["U"].shape), "Vh_shape": tuple(results[n]["Vh"].shape)}
            for n in mine}] if group.rank == src else [None]
        dist.broadcast_object_list(meta, src=global_ranks[src], group=group.group)
        meta = meta[0]
        numels = [(meta[n]["U_shape"], meta[n]["Vh_shape"]) for n in mine]
        total = sum(_numel(u) + _numel(v) for u, v in numels)
        if group.rank == src:
            flat = torch.cat([t.reshape(-1).to(device, torch.float32) for n in mine
                              for t in (results[n]["U"], results[n]["Vh"])]) if mine else torch.empty(0, device=device)
        else:
            flat = torch.empty(total, dtype=torch.float32, device=device)
        if total:
            dist.broadcast(flat, src=global_ranks[src], group=group.group)
        if group.rank != src:
            offset = 0
            for n, (u_shape, vh_shape) in zip(mine, numels):
                U = flat[offset:offset + _numel(u_shape)].view(u_shape)
                offset += _numel(u_shape)
                Vh = flat[offset:offset + _numel(vh_shape)].view(vh_shape)
                offset += _numel(vh_shape)
                info = {k: v for k, v in meta[n].items() if k not in ("U_shape", "Vh_shape")}
                out[n] = {**info, "U": U, "Vh": Vh}
    return out


def _numel(shape) -> int:
    count = 1
    for s in shape:
        count *= s
    return count
