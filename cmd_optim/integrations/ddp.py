"""A DistributedDataParallel communication hook that all-reduces what the reduced phase reads after the switch.

With DDP every rank holds the same parameters, decomposes the same warm-up trajectory with the same
seed and finds the same modes (the optimizer checks it at the switch). :func:`register_cmd_hook` then
replaces DDP's gradient all-reduce, in the mode phase, by an all-reduce of each bucket's contribution to
the mode gradient (C numbers, plus the gradients of the bucket's ``keep_free`` parameters). The
projection is linear, so the sum over buckets of the averaged contributions is the projection of the
averaged gradient. In the packed gradual phase (embedded CMD) it all-reduces the gradients of the elements
not embedded yet and of the free parameters, and writes them back averaged (the embedded elements' gradient
is not used, so it is not sent): the bytes fall with every embedding round.

The hook talks to the optimizer's public :class:`~cmd_optim.optim.ModeExchange` only (it and the
optimizer do not import each other); in the warm-up it is DDP's default all-reduce.
"""
# No ``from __future__ import annotations``: DDP checks the hook's annotations at registration.

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["CMDHookState", "register_cmd_hook"]


@dataclass
class CMDHookState:
    """What the hook keeps: the optimizer's exchange, the process group, and a count of what was sent.

    ``bytes_sent`` counts the bytes this rank passed to all-reduce; ``bucket_calls`` the buckets.
    """

    exchange: object
    process_group: object = None
    bytes_sent: int = 0
    bucket_calls: int = 0


def _exchange_of(optimizer):
    """The mode exchange of a CMDOptimizer, unwrapping wrappers such as accelerate's."""
    while optimizer is not None and not hasattr(optimizer, "mode_exchange"):
        optimizer = getattr(optimizer, "optimizer", None)
    return None if optimizer is None else optimizer.mode_exchange


def register_cmd_hook(ddp_model: "torch.nn.parallel.DistributedDataParallel", optimizer,
                      process_group=None) -> CMDHookState:
    """Register the CMD communication hook on ``ddp_model``; returns its state (with the byte count).

    Warm-up (and reductions that read the whole gradient): DDP's default averaged all-reduce. Packed gradual
    phase: per bucket one all-reduce of the live elements' gradients and the free parameters', written back
    averaged (the embedded elements' ``.grad`` become 0). Mode phase: per bucket one all-reduce of
    ``[sum_i u_i g_i per coefficient, gradients of the bucket's keep_free parameters]``; the mode sums
    reach ``optimizer.step()``, the free gradients are written back averaged, and the mapped parameters'
    ``.grad`` keep this rank's local gradient (so clipping them changes nothing; the non-finite check
    acts on the averaged mode gradient, the same on every rank).
    """
    exchange = _exchange_of(optimizer)
    if exchange is None:
        raise TypeError(f"register_cmd_hook needs a CMDOptimizer, got {type(optimizer).__name__}")
    state = CMDHookState(exchange, process_group)
    ddp_model.register_comm_hook(state, _cmd_hook)
    exchange.mark_hooked()
    return state


def _cmd_hook(state: CMDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    exchange = state.exchange
    buffer = bucket.buffer()
    state.bucket_calls += 1
    if not exchange.active:
        state.bytes_sent += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(state.process_group, bucket)

    params, grads = bucket.parameters(), bucket.gradients()
    world = dist.get_world_size(state.process_group)
    if exchange.packed:
        payload = exchange.pack(params, grads).div_(world)
        state.bytes_sent += payload.numel() * payload.element_size()

        def write_back(fut):
            exchange.unpack(bucket.index(), fut.value()[0], params, grads)
            return buffer

        return dist.all_reduce(payload, group=state.process_group, async_op=True).get_future().then(write_back)

    free = [g for p, g in zip(params, grads) if not exchange.is_mapped(p)]
    sums = exchange.mode_sums(params, grads)
    payload = torch.cat([sums.to(buffer.dtype), *(g.reshape(-1) for g in free)]).div_(world)
    state.bytes_sent += payload.numel() * payload.element_size()

    def unpack(fut):
        reduced = fut.value()[0]
        exchange.deposit(bucket.index(), reduced[: sums.numel()])
        offset = sums.numel()
        for g in free:
            g.copy_(reduced[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return buffer

    return dist.all_reduce(payload, group=state.process_group, async_op=True).get_future().then(unpack)
