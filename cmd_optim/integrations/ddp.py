"""A DistributedDataParallel communication hook that all-reduces what the reduced phase reads after the switch.

With DDP every rank holds the same parameters, decomposes the same warm-up trajectory with the same
seed and finds the same modes (the optimizer checks it at the switch). :func:`register_cmd_hook` then
replaces DDP's gradient all-reduce, in the mode phase, by an all-reduce of each bucket's contribution to
the mode gradient (C numbers, plus the gradients of the bucket's ``keep_free`` parameters). The
projection is linear, so the sum over buckets of the averaged contributions is the projection of the
averaged gradient. In the packed gradual phase (embedded CMD) it all-reduces the gradients of the elements
not embedded yet and of the free parameters, and writes them back averaged (by default the embedded elements'
gradient is not used, so it is not sent): the bytes fall with every embedding round. With
``Gradual(embedded_gradient="pooled")`` each bucket also sends its M mode sums ``sum_i a_i g_i`` over its
embedded elements (linear: the averaged sums are the sums of the averaged gradient), which the phase pools
into its references' gradients.

In the low-rank phase (the default reduction) it compresses, PowerSGD-style at rank 1 with error feedback
(:func:`power_step_reference`), each projected matrix's *core* gradient (r x D: r + D numbers, where PowerSGD
sends m + n for the matrix) and each matrix trained in full (m + n); vectors, and matrices whose two factors
would not be fewer numbers, go whole. The lifted average is written into ``.grad``, so the phase's projection
recovers it and its residual is 0. The bases stay the phase's: each refresh finds them from this rank's own
gradient, which the hook leaves with the exchange on that step, and takes the first rank's (d r numbers
per matrix every ``refresh_every`` steps). An average that is not finite (a NaN on any rank) reaches every
rank's ``.grad`` alike, so the optimizer refuses the step on all of them, and leaves the hook's errors and
vectors as they were.

The hook talks to the optimizer's public :class:`~cmd_optim.optim.ModeExchange` only (it and the
optimizer do not import each other); in the warm-up it is DDP's default all-reduce.
"""
# No ``from __future__ import annotations``: DDP checks the hook's annotations at registration.

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["CMDHookState", "power_step_reference", "register_cmd_hook"]


@dataclass
class CMDHookState:
    """What the hook keeps: the optimizer's exchange, the process group, and a count of what was sent.

    ``bytes_sent`` counts the bytes this rank passed to all-reduce; ``bucket_calls`` the buckets. In the
    low-rank phase, per compressed matrix: ``errors``, this rank's error feedback (float32, core-shaped for a
    projected matrix, (m, n) for one trained in full; dropped when a new low-rank phase is attached, the
    exchange's count ``attachments``), and ``vectors``, the warm-started unit vector q on the matrix's long
    side, the same on every rank, first drawn from ``seed``. ``names``: each parameter's name in the module, the
    keys of :meth:`state_dict`.
    """

    exchange: object
    process_group: object = None
    bytes_sent: int = 0
    bucket_calls: int = 0
    seed: int = 0
    errors: dict = field(default_factory=dict)
    vectors: dict = field(default_factory=dict)
    attachments: int = 0
    names: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """This rank's error feedback and warm-start vectors by parameter name (the errors of projected matrices
        in the current bases), and the byte and bucket counts: tensors and plain values, for
        ``torch.load(..., weights_only=True)``. The errors differ by rank: each rank saves its own."""
        errors = {}
        if self.attachments == self.exchange.attachments:  # else they belong to an earlier phase
            for p, error in self.errors.items():
                if self.exchange.projects(p):
                    error = self.errors[p] = self.exchange.rebase(p, error)
                errors[self.names[p]] = error
        return {"errors": errors, "vectors": {self.names[p]: q for p, q in self.vectors.items()},
                "bytes_sent": self.bytes_sent, "bucket_calls": self.bucket_calls, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s errors and vectors, after the optimizer's own ``load_state_dict`` (the
        errors are expressed in its low-rank phase's bases). Every entry is checked before any is taken: a
        rejected state leaves the hook as it was."""
        if not isinstance(state, dict) or set(state) != {"errors", "vectors", "bytes_sent", "bucket_calls", "seed"}:
            raise ValueError("CMDHookState.load_state_dict: expected the keys errors, vectors, bytes_sent, "
                             f"bucket_calls and seed, got {sorted(state) if isinstance(state, dict) else state!r}")
        if not all(isinstance(state[key], dict) for key in ("errors", "vectors")):
            raise ValueError("CMDHookState.load_state_dict: errors and vectors should be dicts by parameter name")
        by_name = {name: p for p, name in self.names.items()}
        if (state["errors"] or state["vectors"]) and not self.exchange.low_rank:
            raise ValueError("CMDHookState.load_state_dict: the state holds a low-rank phase's error feedback, but "
                             "the optimizer is not in that phase; load the optimizer's state_dict first")
        taken = {}
        for key, expected in (("errors", _sent_shape), ("vectors", lambda e, p: (max(_sent_shape(e, p)),))):
            taken[key] = {}
            for name, value in state[key].items():
                p = by_name.get(name)
                if p is None or p.ndim < 2:
                    raise ValueError(f"CMDHookState.load_state_dict: {key}[{name!r}] names no matrix of the model")
                shape = expected(self.exchange, p)
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                if got != shape:
                    raise ValueError(f"CMDHookState.load_state_dict: {key}[{name!r}] should be a tensor of shape "
                                     f"{shape}, got {got}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"CMDHookState.load_state_dict: {key}[{name!r}] is not a finite tensor")
                taken[key][p] = value.to(device=p.device, dtype=torch.float32)
        self.errors, self.vectors = taken["errors"], taken["vectors"]
        self.attachments = self.exchange.attachments
        self.bytes_sent, self.bucket_calls, self.seed = (int(state[k]) for k in ("bytes_sent", "bucket_calls", "seed"))


def _sent_shape(exchange, p: torch.Tensor) -> tuple[int, ...]:
    """The shape the low-rank exchange compresses for matrix ``p``: its core, or its (m, n) gradient."""
    if exchange.projects(p):
        return tuple(exchange.core_shape(p))
    return (p.shape[0], p[0].numel())


def _exchange_of(optimizer):
    """The mode exchange of a CMDOptimizer, unwrapping wrappers such as accelerate's."""
    while optimizer is not None and not hasattr(optimizer, "mode_exchange"):
        optimizer = getattr(optimizer, "optimizer", None)
    return None if optimizer is None else optimizer.mode_exchange


def register_cmd_hook(ddp_model: "torch.nn.parallel.DistributedDataParallel", optimizer,
                      process_group=None) -> CMDHookState:
    """Register the CMD communication hook on ``ddp_model``; returns its state (with the byte count).

    Warm-up (and reductions that read the whole gradient): DDP's default averaged all-reduce. Packed gradual
    phase: per bucket one all-reduce of the live elements' gradients and the free parameters' (and, pooled, the
    bucket's M mode sums), written back averaged (the embedded elements' ``.grad`` become 0). Mode phase:
    per bucket one all-reduce of
    ``[sum_i u_i g_i per coefficient, gradients of the bucket's keep_free parameters]``; the mode sums
    reach ``optimizer.step()``, the free gradients are written back averaged, and the mapped parameters'
    ``.grad`` keep this rank's local gradient (so clipping them changes nothing; the non-finite check
    acts on the averaged mode gradient, the same on every rank). Low-rank phase: per bucket one all-reduce of
    the whole tensors and the compressed matrices' p factors, one of their q factors; every ``.grad`` is
    written back as the same average on every rank (see the module).
    """
    exchange = _exchange_of(optimizer)
    if exchange is None:
        raise TypeError(f"register_cmd_hook needs a CMDOptimizer, got {type(optimizer).__name__}")
    state = CMDHookState(exchange, process_group, names={p: n for n, p in ddp_model.module.named_parameters()})
    ddp_model.register_comm_hook(state, _cmd_hook)
    exchange.mark_hooked(process_group)
    return state


def _cmd_hook(state: CMDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    exchange = state.exchange
    buffer = bucket.buffer()
    state.bucket_calls += 1
    if not exchange.active:
        state.bytes_sent += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(state.process_group, bucket)
    if exchange.low_rank:
        with exchange.same_rounding():
            _low_rank_exchange(state, bucket)
        exchange.exchanged(bucket.index())
        done = torch.futures.Future()
        done.set_result(buffer)
        return done

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


def power_step_reference(matrices: list[torch.Tensor], q: torch.Tensor):
    """One rank-1 power step on the ranks' matrices M_k (a, b) from the unit vector q (b,): ``p = mean_k M_k q``
    normalised, ``q' = mean_k M_k^T p``; returns the average approximation ``p q'^T`` (a, b), the next unit
    vector ``q' / |q'|`` (q where q' is 0) and each rank's error ``M_k - p q'^T``."""
    p = torch.stack([m @ q for m in matrices]).mean(0)
    p = p / p.norm() if p.norm() > 0 else p
    q_next = torch.stack([m.T @ p for m in matrices]).mean(0)
    approx = torch.outer(p, q_next)
    unit = q_next / q_next.norm() if q_next.norm() > 0 else q
    return approx, unit, [m - approx for m in matrices]


def _compressed(shape) -> bool:
    """Whether a matrix of ``shape`` (a, b) goes as rank-1 factors: they are fewer numbers than it."""
    a, b = shape
    return a + b < a * b


def _oriented(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with its long side last (transposed if need be): q lives on that side, which a refresh of a
    projected matrix's basis does not rotate."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def _low_rank_exchange(state: CMDHookState, bucket: dist.GradBucket) -> None:
    """The low-rank phase's exchange of one bucket, in place. Both all-reduces are waited for here, so that every
    product on the averages runs on this thread, at the phase's thread count."""
    exchange, world = state.exchange, dist.get_world_size(state.process_group)
    dtype, tiny = bucket.buffer().dtype, torch.finfo(torch.float32).tiny
    refresh = exchange.refresh_due
    if state.attachments != exchange.attachments:  # a new phase: the errors are in unrelated bases
        state.errors.clear()
        state.attachments = exchange.attachments
    whole, matrices = [], []  # (what is sent, parameter, gradient); (parameter, gradient, sent + error, oriented)
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        projected = exchange.projects(p)
        if projected and refresh:
            exchange.stash(p, g)
        sent = exchange.project(p, g) if projected else g.reshape(g.shape[0], -1) if g.ndim >= 2 else g
        if g.ndim < 2 or not _compressed(sent.shape):
            whole.append((sent, p, g))
            continue
        error = state.errors.get(p)
        total = (sent.to(torch.float32, copy=True) if error is None  # not a view of the bucket: it is written to
                 else sent + (exchange.rebase(p, error) if projected else error))
        if p not in state.vectors:
            draw = torch.Generator().manual_seed(state.seed * 1_000_003 + len(state.vectors))
            q = torch.randn(max(sent.shape), generator=draw)
            state.vectors[p] = (q / q.norm()).to(g.device)
        matrices.append((p, g, total, _oriented(total)))
    first = torch.cat([*(sent.reshape(-1).to(dtype) for sent, _, _ in whole),
                       *((m @ state.vectors[p]).to(dtype) for p, _, _, m in matrices)])
    first = _all_reduced(state, first.div_(world))
    pieces = first.split([sent.numel() for sent, _, _ in whole] + [m.shape[0] for *_, m in matrices])
    for (sent, p, g), average in zip(whole, pieces):
        _write(exchange, p, g, average.view(sent.shape))
    if not matrices:
        return
    ps = [p_avg.float() / torch.linalg.vector_norm(p_avg.float()).clamp_min(tiny) for p_avg in pieces[len(whole):]]
    second = torch.cat([(m.T @ p_hat).to(dtype) for (*_, m), p_hat in zip(matrices, ps)])
    second = _all_reduced(state, second.div_(world))
    finite = bool(torch.isfinite(first).all() and torch.isfinite(second).all())  # else no step: keep the state
    qs = second.float().split([m.shape[1] for *_, m in matrices])
    for (p, g, total, _), p_hat, q_avg in zip(matrices, ps, qs):
        approx = torch.outer(p_hat, q_avg)
        approx = approx if approx.shape == total.shape else approx.T
        _write(exchange, p, g, approx)
        if finite:
            state.errors[p] = total - approx
            norm = torch.linalg.vector_norm(q_avg)
            state.vectors[p] = torch.where(norm > 0, q_avg / norm.clamp_min(tiny), state.vectors[p])


def _write(exchange, p: torch.Tensor, g: torch.Tensor, average: torch.Tensor) -> None:
    """Write the ``average`` of what was sent for ``p`` (its core, or its gradient) into the bucket's ``g``."""
    g.copy_((exchange.lift(p, average.float()) if exchange.projects(p) else average).view_as(g))


def _all_reduced(state: CMDHookState, payload: torch.Tensor) -> torch.Tensor:
    """``payload`` (each rank's share, already divided by the ranks) summed over the ranks in place, waited
    for; its bytes counted."""
    state.bytes_sent += payload.numel() * payload.element_size()
    dist.all_reduce(payload, group=state.process_group)
    return payload
