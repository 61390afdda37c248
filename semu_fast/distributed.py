"""SEMU on torch.distributed: a data-parallel forget pass and a layer-sharded SVD phase.

Each rank runs the forget pass over its own shard of the forget data; the float32 accumulators are then summed
across ranks in a few bucketed all-reduces (one per BUCKET_BYTES of gradient, not one per layer). The SVDs are split
by cost: every layer has an owner rank that computes its factors, and each rank broadcasts all its layers' U and Vh
in one call. Every rank ends with the same adapters as a single process over the whole forget set.

Works with any backend (gloo on CPU, nccl on GPU) and with DistributedDataParallel-wrapped models (the pass runs on
.module, outside DDP's own gradient reduction). FSDP shards each weight across ranks, while the SVD of a layer needs
its full gradient on one rank: gather it (for example by running the pass under FSDP.summon_full_params with
full, unsharded gradients) or unwrap the model first; FSDP models are refused with that advice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

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
    if distributed is False or not initialised:
        return None
    size = dist.get_world_size(process_group)
    if distributed is None and size == 1:
        return None
    return Group(process_group, dist.get_rank(process_group), size)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (the forget pass must not trigger DDP's per-batch gradient averaging);
    sharded models (FSDP1's wrapper, FSDP2's fully_shard, any DTensor parameter) are refused with what they need."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    if _is_sharded(model):
        raise TypeError("FSDP-sharded models (or any with DTensor parameters) are not supported: SEMU's SVD needs "
                        "each layer's full gradient on one rank and its adapter the full weight. Pass the unwrapped "
                        "model (or load its full state dict into an unwrapped copy); see semu_fast/distributed.py")
    return model


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = FullyShardedDataParallel
    return (any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())
            or any(isinstance(p, DTensor) for p in model.parameters()))


def all_reduce_sum_(tensors: list[torch.Tensor], group: Group) -> None:
    """tensors[i] = sum over ranks of tensors[i], in place, in buckets of at most BUCKET_BYTES per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
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
            flat = torch.cat([t.reshape(-1).float() for n in mine for t in (results[n]["U"], results[n]["Vh"])]
                             ) if mine else torch.empty(0, device=device)
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
