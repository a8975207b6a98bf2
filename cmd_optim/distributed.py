"""Data-parallel CMD on torch.distributed: identical modes on every rank, and a mode-space all-reduce.

With ``DistributedDataParallel`` every rank holds the same parameters, so every rank decomposes the
same warm-up trajectory with the same seed and finds the same modes; :func:`check_rank_consistency`
verifies it at the switch. :func:`register_cmd_hook` then replaces DDP's gradient all-reduce, in the
reduced phase, by an all-reduce of each bucket's contribution to the mode gradient (``G x M`` numbers,
plus the gradients of ``keep_free`` parameters in the bucket). The projection is linear, so the sum
over buckets of the averaged contributions is the projection of the averaged gradient.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .decomposition import Decomposition
from .optimizer import CMDOptimizer, find_cmd_optimizer


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_rank_consistency(d: Decomposition, group=None) -> None:
    """Raise if the ranks of ``group`` hold different decompositions (a no-op outside torch.distributed).

    Compares a fingerprint (sizes, references, a hash of the assignment, sums of a and b) by an
    all-reduce of its minimum and maximum.
    """
    if _world(group) == 1:
        return
    weights = torch.arange(1, d.num_params + 1, dtype=torch.float64, device=d.assignment.device)
    fingerprint = torch.stack([
        torch.tensor(float(d.num_params), dtype=torch.float64), torch.tensor(float(d.num_modes), dtype=torch.float64),
        (d.references.double().cpu() * torch.arange(1, d.num_modes + 1, dtype=torch.float64)).sum(),
        (d.assignment.double() * weights).sum().cpu(), d.a.double().sum().cpu(), d.b.double().sum().cpu(),
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


@dataclass
class CMDHookState:
    """What :func:`register_cmd_hook` keeps: the optimizer, the group, and a count of what was sent.

    ``bytes_sent`` counts the bytes this rank passed to all-reduce; ``bucket_calls`` the buckets.
    """
    optimizer: CMDOptimizer
    process_group: object = None
    bytes_sent: int = 0
    bucket_calls: int = 0
    _index: dict = field(default_factory=dict)


def register_cmd_hook(ddp_model: "torch.nn.parallel.DistributedDataParallel", optimizer,
                      process_group=None) -> CMDHookState:
    """Register the CMD communication hook on ``ddp_model``; returns its state (with the byte count).

    Warm-up: the ordinary averaged all-reduce of every bucket. Reduced phase: per bucket one all-reduce of
    ``[sum_i u_i g_i per (group, mode), gradients of the bucket's keep_free parameters]``; the mode sums
    reach ``optimizer.step()``, the free gradients are written back averaged, and the tracked
    parameters' ``.grad`` keep this rank's local gradient (so clipping them changes nothing; the
    non-finite check acts on the averaged mode gradient, the same on every rank).
    """
    cmd = find_cmd_optimizer(optimizer)
    if cmd is None:
        raise TypeError(f"register_cmd_hook needs a CMDOptimizer, got {type(optimizer).__name__}")
    state = CMDHookState(cmd, process_group)
    state._index = {p: i for i, p in enumerate(cmd._tracked)}
    ddp_model.register_comm_hook(state, _cmd_hook)
    cmd._hooked = True
    return state


def _cmd_hook(state: CMDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    group, world = state.process_group, _world(state.process_group)
    optimizer = state.optimizer
    buffer = bucket.buffer()
    state.bucket_calls += 1
    if optimizer.phase == "warmup" or optimizer._projection is None:
        buffer.div_(world)
        state.bytes_sent += buffer.numel() * buffer.element_size()
        future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0])

    grads = [None] * len(optimizer._tracked)
    free = []
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        index = state._index.get(p)
        if index is None:
            free.append(g)
        else:
            grads[index] = g
    sums = optimizer._projection.mode_sums(grads)
    payload = torch.cat([sums.reshape(-1).to(buffer.dtype), *(g.reshape(-1) for g in free)]).div_(world)
    state.bytes_sent += payload.numel() * payload.element_size()

    def unpack(fut):
        reduced = fut.value()[0]
        optimizer._add_mode_sums(bucket.index(), reduced[: sums.numel()].view_as(sums))
        offset = sums.numel()
        for g in free:
            g.copy_(reduced[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return buffer

    return dist.all_reduce(payload, group=group, async_op=True).get_future().then(unpack)
