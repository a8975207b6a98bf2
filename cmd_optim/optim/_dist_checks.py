"""What needs torch.distributed: identical decompositions on every rank, one rank's values for all, and the
setups CMD refuses."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core import Decomposition, SlopeFit
from .sharding import one_mesh

__all__ = ["agree_with_first_rank", "check_rank_consistency", "refuse_sharding", "replica_threads", "world_size"]

_ADVICE = "use DistributedDataParallel (with cmd_optim.integrations.ddp.register_cmd_hook) instead"


def world_size(group=None) -> int:
    """The ranks of ``group`` (1 outside torch.distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_with_first_rank(tensors: list[torch.Tensor], group=None) -> None:
    """Overwrite ``tensors`` (the same shapes on every rank) with the first rank's, in one broadcast: for
    results that ranks may round differently (LAPACK with other thread counts) but must share."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_collective_device(group))
    dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def replica_threads(numels: list[int], group=None) -> tuple[bool, int | None]:
    """Whether the ranks of ``group`` hold replicas (the same ``numels``, e.g. of a DDP model's matrices), and
    if so the smallest intra-op thread count among them where the counts differ (else None): BLAS splits a
    product by thread, so ranks with other counts round it differently. One collective."""
    signature = [torch.get_num_threads(), len(numels), sum(numels), sum(i * n for i, n in enumerate(numels, 1))]
    values = torch.tensor(signature + [-v for v in signature], dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=group)
    low, high = values[:4].tolist(), [-v for v in values[4:].tolist()]
    replicas = low[1:] == high[1:]
    return replicas, int(low[0]) if replicas and low[0] != high[0] else None


def check_rank_consistency(d: Decomposition | SlopeFit, group=None) -> None:
    """Raise if the ranks of ``group`` hold different decompositions (a no-op outside torch.distributed).

    Compares a fingerprint (sizes, references, a hash of the assignment, the sum of the slopes) by an
    all-reduce of its minimum and maximum.
    """
    if world_size(group) == 1:
        return
    weights = torch.arange(1, d.num_params + 1, dtype=torch.float64, device=d.assignment.device)
    fingerprint = torch.stack([
        torch.tensor(float(d.num_params), dtype=torch.float64), torch.tensor(float(d.num_modes), dtype=torch.float64),
        (d.references.double().cpu() * torch.arange(1, d.num_modes + 1, dtype=torch.float64)).sum(),
        (d.assignment.double() * weights).sum().cpu(), d.a.double().sum().cpu(),
    ]).to(_collective_device(group))
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"CMD decompositions differ across ranks (rank {dist.get_rank(group)}: {d.num_params} parameters, "
            f"{d.num_modes} modes; fingerprints range from {low.tolist()} to {high.tolist()}). Every rank must "
            "hold identical parameters during the warm-up: wrap the model in DistributedDataParallel. "
            "ZeroRedundancyOptimizer and FSDP give each rank a different share of the parameters and are "
            "not supported."
        )


def refuse_sharding(model, params, base) -> None:
    """What CMD cannot decompose: FSDP1's flat parameters and ZeroRedundancyOptimizer (ranks hold different
    flat shards, not row shards of each parameter), and DTensor parameters on more than one set of ranks or
    on a mesh of more than one dimension (HSDP, tensor parallelism). FSDP2 (``fully_shard``) on one 1-D mesh
    is supported, also as several DeviceMesh objects over the same ranks (``fully_shard`` per block, then
    on the root, without a mesh)."""
    if type(model).__name__ == "FullyShardedDataParallel" or any(getattr(p, "_is_flat_param", False) for p in params):
        raise TypeError("CMDOptimizer does not support FSDP1's flat parameters: shard with FSDP2's fully_shard, or "
                        f"{_ADVICE}")
    if isinstance(base, type) and base.__name__ == "ZeroRedundancyOptimizer":
        raise TypeError(f"CMDOptimizer does not support base=ZeroRedundancyOptimizer (DeepSpeed's ZeRO neither): "
                        f"shard with FSDP2's fully_shard, or {_ADVICE}")
    one_mesh(params)
