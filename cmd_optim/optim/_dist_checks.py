"""Checks that need torch.distributed: identical decompositions on every rank, and setups CMD refuses."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core import Decomposition, SlopeFit
from .sharding import one_mesh

__all__ = ["check_rank_consistency", "refuse_sharding"]

_ADVICE = "use DistributedDataParallel (with cmd_optim.integrations.ddp.register_cmd_hook) instead"


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_rank_consistency(d: Decomposition | SlopeFit, group=None) -> None:
    """Raise if the ranks of ``group`` hold different decompositions (a no-op outside torch.distributed).

    Compares a fingerprint (sizes, references, a hash of the assignment, the sum of the slopes) by an
    all-reduce of its minimum and maximum.
    """
    if _world(group) == 1:
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
