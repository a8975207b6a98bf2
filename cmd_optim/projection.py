"""The reduced map of CMD training: parameters move only along their modes.

After the warm-up, parameter ``i`` of mode ``m`` moves as ``w_i += u_i * delta_psi[m]``, where ``u_i`` is
its CMD slope ``a_i`` divided by the root-mean-square slope of its mode (so a unit move of a mode
coefficient moves a typical member by one unit, as one step of a coordinate-wise optimizer would), and
clipped to ``[-max_coefficient, max_coefficient]`` (members whose reference barely moves would
otherwise get slopes in the thousands). Each parameter group has its own M mode coefficients, so
per-group hyperparameters keep their meaning.

Per parameter the map stores ``u`` (float32) and its mode's histogram bin (uint8): 5 bytes. They are
kept in flat blocks: a large parameter has its own block, worked on in slices of ``CHUNK`` elements;
small parameters of one group and device share a block, so that a model of many small tensors costs a
few kernels per step rather than a few per tensor.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from .decomposition import Decomposition

#: Largest |u| (slopes relative to their mode's RMS slope) a parameter may keep.
MAX_COEFFICIENT = 10.0
#: Elements per work item in ``mode_sums`` and ``apply`` (each worker thread has 2 scratch buffers of
#: this size, 2 MiB).
CHUNK = 1 << 18
#: Parameters with fewer elements than this are packed into shared blocks of at most ``CHUNK``.
PACK_BELOW = CHUNK // 4
#: Below this many elements one thread does the work. Measured after a backward pass on 2 cores, the
#: split loses below about 8M (OpenMP's threads still spin from the backward and take the second core's
#: time) and wins above (25M: 38 against 50 ms).
PARALLEL_ELEMENTS = 1 << 23
#: Interleaved histogram bins per mode (fewer when M > 32, so that the bin fits in a byte).
LANES = 8


@dataclass
class _Block:
    """Slopes and bins of consecutive projected parameters of one group and device, stored flat.

    ``members`` are the parameters' indices, ``sizes`` their element counts (in block order).
    """

    u: torch.Tensor  # (n,) float32
    bins: torch.Tensor  # (n,) uint8
    group: int
    members: list[int]
    sizes: list[int]


class ModeProjection:
    """Coefficients ``u`` and modes of the projected parameters, and the two directions of the map.

    Args:
        coefficients: one float32 tensor per projected parameter, shaped like it.
        modes: one uint8 tensor per projected parameter, shaped like it.
        groups: the parameter-group index of each projected parameter.
        num_modes: M.
        num_groups: how many parameter groups there are.
    """

    def __init__(self, coefficients, modes, groups, num_modes, num_groups):
        coefficients, modes = list(coefficients), list(modes)
        self.groups = list(groups)
        self.num_modes = num_modes
        self.num_groups = num_groups
        # Squared norm of each (group, mode) direction: dividing by it makes the mode step the
        # least-squares projection of the full step, whatever the scale of u.
        norms = torch.zeros(num_groups, num_modes, dtype=torch.float64)
        for u, mode, group in zip(coefficients, modes, self.groups):
            norms[group] += torch.zeros(num_modes, dtype=torch.float64).index_add_(
                0, mode.reshape(-1).long().cpu(), u.reshape(-1).double().square().cpu())
        self.active = norms > 0  # (group, mode) pairs that move some parameter
        self.device = coefficients[0].device if coefficients else torch.device("cpu")
        self.direction_norms = norms.float().clamp_min(torch.finfo(torch.float32).tiny).to(self.device)
        # Each parameter keeps one byte: its histogram bin, mode * lanes + (position in its block % lanes).
        # Spreading a mode over interleaved bins keeps runs of one mode (whole rows usually share one)
        # from serialising the histogram in ``mode_sums`` on a single bin.
        self.lanes = max(1, min(LANES, 256 // num_modes))
        self._blocks = [self._block(members, coefficients, modes) for members in self._packing(coefficients)]
        self.coefficients, self.bins = [None] * len(coefficients), [None] * len(coefficients)
        for block in self._blocks:  # per-parameter views, shaped like the parameters
            for index, u, bins in zip(block.members, block.u.split(block.sizes), block.bins.split(block.sizes)):
                self.coefficients[index] = u.view_as(coefficients[index])
                self.bins[index] = bins.view_as(coefficients[index])
        self._items = [(block, start, min(start + CHUNK, len(block.u)))
                       for block in self._blocks for start in range(0, len(block.u), CHUNK)]
        # Serial kernels (the histogram, the gather) share the CPU cores: the calling thread and a pool,
        # each single-threaded; on an accelerator one thread queues everything.
        total = sum(u.numel() for u in coefficients)
        parallel = self.device.type == "cpu" and total >= PARALLEL_ELEMENTS
        self._workers = max(1, min(torch.get_num_threads(), len(self._items))) if parallel else 1
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _packing(self, coefficients) -> list[list[int]]:
        """Parameter indices per block: a large parameter alone, runs of small ones (one group and
        device) up to ``CHUNK`` elements together."""
        blocks, pack, packed, key = [], [], 0, None
        for index, u in enumerate(coefficients):
            n = u.numel()
            if n >= PACK_BELOW:
                blocks.append([index])
                continue
            if pack and ((self.groups[index], u.device) != key or packed + n > CHUNK):
                blocks.append(pack)
                pack, packed = [], 0
            pack.append(index)
            packed += n
            key = (self.groups[index], u.device)
        return blocks + [pack] if pack else blocks

    def _block(self, members, coefficients, modes) -> _Block:
        u = torch.cat([coefficients[i].reshape(-1).float() for i in members])
        mode = torch.cat([modes[i].reshape(-1) for i in members]).to(u.device, torch.uint8)
        bins = mode * self.lanes + _lanes(len(mode), self.lanes, u.device)
        return _Block(u, bins, self.groups[members[0]], members, [coefficients[i].numel() for i in members])

    @classmethod
    def from_decomposition(cls, d: Decomposition, params, groups, num_groups, max_coefficient=MAX_COEFFICIENT):
        """Slice a Decomposition of the concatenated ``params`` into per-parameter coefficients."""
        if d.num_modes > 256:
            raise ValueError(f"at most 256 modes are supported, got {d.num_modes}")
        a = d.a.float()
        rms = (torch.zeros(d.num_modes, device=a.device).index_add_(0, d.assignment, a.square())
               / d.mode_sizes.clamp_min(1)).sqrt()
        u = (a / torch.where(rms > 0, rms, 1)[d.assignment]).clamp_(-max_coefficient, max_coefficient)
        coefficients, modes, offset = [], [], 0
        for p in params:
            n = p.numel()
            coefficients.append(u[offset:offset + n].view_as(p).to(p.device, torch.float32))
            modes.append(d.assignment[offset:offset + n].view_as(p).to(p.device, torch.uint8))
            offset += n
        projection = cls(coefficients, modes, groups, d.num_modes, num_groups)
        projection.mode_rms = rms.to(projection.device)
        return projection

    def warmup_speed(self, d: Decomposition, steps_per_snapshot: int) -> torch.Tensor:
        """The fastest per-step change of each mode coefficient during the warm-up, (M,).

        A reference has ``u = 1 / rms`` of its mode, so a change ``dr`` of its value is a change
        ``dr * rms`` of the coefficient; the snapshots are ``steps_per_snapshot`` steps apart.
        """
        per_snapshot = d.profiles.diff(dim=1).abs().amax(dim=1).to(self.device)
        return per_snapshot * self.mode_rms / steps_per_snapshot

    def project(self, grads) -> torch.Tensor:
        """Mode gradients (num_groups, M): ``sum_i u_i g_i / sum_i u_i^2`` over each group's modes."""
        return self.from_sums(self.mode_sums(grads))

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Mode gradients (num_groups, M) from their numerators (:meth:`mode_sums`, summed over parts or ranks)."""
        return sums.to(self.device).float() / self.direction_norms

    def mode_sums(self, grads) -> torch.Tensor:
        """The numerators of :meth:`project`, (num_groups, M) float64: ``sum_i u_i g_i``.

        ``grads`` lists one tensor (or None, left out) per projected parameter. The sums are linear in
        the gradients, so sums over parts of the parameters (a DDP bucket) or over ranks add up.
        """
        grads = [None if g is None else g.reshape(-1) for g in grads]
        items = self._items
        if any(g is None for g in grads):  # a DDP bucket holds a few parameters
            items = [item for item in items if any(grads[i] is not None for i in item[0].members)]

        def work(worker: int) -> torch.Tensor:
            sums = torch.zeros(self.num_groups, self.num_modes * self.lanes, dtype=torch.float64, device=self.device)
            values, index = self._scratch(worker)
            for block, start, end in items[worker::self._workers]:
                product = values[: end - start]
                if len(block.members) == 1:
                    torch.mul(block.u[start:end], grads[block.members[0]][start:end], out=product)
                else:
                    _gather_grads([grads[i] for i in block.members], block.sizes, product)
                    product.mul_(block.u)
                sums[block.group].add_(self._sum_by_bin(product, block.bins[start:end], index))
            return sums

        shares = self._run(work)
        sums = shares[0] if len(shares) == 1 else torch.stack(shares).sum(0)
        return sums.view(self.num_groups, self.num_modes, self.lanes).sum(2)

    def apply(self, params, delta: torch.Tensor) -> None:
        """Move each parameter by ``u * delta[group, mode]``; ``delta`` is (num_groups, M).

        A parameter without a gradient in this step is left alone, as a base optimizer would.
        """
        table = delta.to(self.device, torch.float32).repeat_interleave(self.lanes, dim=1)  # per bin
        flat = [p.view(-1) if p.grad is not None else None for p in params]

        def work(worker: int) -> None:
            values, index = self._scratch(worker)
            for block, start, end in self._items[worker::self._workers]:
                targets = [flat[i] for i in block.members]
                if all(t is None for t in targets):
                    continue
                bins = index[: end - start].copy_(block.bins[start:end])
                step = torch.index_select(table[block.group], 0, bins, out=values[: end - start])
                if len(targets) == 1:
                    targets[0][start:end].addcmul_(step, block.u[start:end])
                    continue
                pieces = step.mul_(block.u).split(block.sizes)
                torch._foreach_add_(*zip(*[(t, s) for t, s in zip(targets, pieces) if t is not None]))

        self._run(work)

    def _sum_by_bin(self, values: torch.Tensor, bins: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(M * lanes,) sums of ``values`` per histogram bin; ``index`` is int32 scratch space.

        On the CPU a histogram (``bincount``); on an accelerator ``bincount`` would synchronise with the
        host, so atomics are used instead.
        """
        size = self.num_modes * self.lanes
        if values.device.type == "cpu":
            return torch.bincount(bins, weights=values, minlength=size)
        return torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(
            0, index[: len(bins)].copy_(bins), values.double())

    def _scratch(self, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-worker float32 and int32 buffers of ``CHUNK`` elements, made on first use."""
        while len(self._buffers) <= worker:
            self._buffers.append((torch.empty(CHUNK, device=self.device),
                                  torch.empty(CHUNK, dtype=torch.int32, device=self.device)))
        return self._buffers[worker]

    def _run(self, work) -> list:
        """``work(worker)`` for every worker: worker 0 on the calling thread, the others on the pool.
        Each owns the items ``worker::workers``, so the result does not depend on thread timing."""
        def no_grad_work(worker: int):
            with torch.no_grad():  # grad mode is thread-local
                return work(worker)

        if self._workers == 1:
            return [no_grad_work(0)]
        others = [_pool(self._workers - 1).submit(no_grad_work, worker) for worker in range(1, self._workers)]
        try:
            with _single_threaded():
                first = no_grad_work(0)
        finally:
            wait(others)  # never return (or raise) while a worker still writes
        return [first, *(future.result() for future in others)]

    @property
    def modes(self) -> list[torch.Tensor]:
        """The mode of every projected parameter (uint8 tensors shaped like them), computed from ``bins``."""
        return [torch.div(b, self.lanes, rounding_mode="floor") for b in self.bins]

    def state_dict(self) -> dict:
        return {"coefficients": self.coefficients, "modes": self.modes, "groups": self.groups,
                "num_modes": self.num_modes, "num_groups": self.num_groups}

    @classmethod
    def from_state_dict(cls, state: dict, params) -> "ModeProjection":
        coefficients = [u.to(p.device) for u, p in zip(state["coefficients"], params)]
        modes = [m.to(p.device) for m, p in zip(state["modes"], params)]
        return cls(coefficients, modes, state["groups"], state["num_modes"], state["num_groups"])


def _gather_grads(grads, sizes, out: torch.Tensor) -> None:
    """Concatenate the flat ``grads`` of a block into ``out``, zeros where a gradient is None."""
    if all(g is not None for g in grads):
        torch.cat(grads, out=out)
        return
    for g, piece in zip(grads, out.split(sizes)):
        if g is None:
            piece.zero_()
        else:
            piece.copy_(g)


def _lanes(n: int, lanes: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[0, 1, ..., lanes - 1, 0, 1, ...]`` of length ``n``."""
    return (torch.arange(n, dtype=torch.int32, device=device) % lanes).to(torch.uint8)


@contextlib.contextmanager
def _single_threaded():
    """No intra-op parallelism on this thread while its share of the work runs beside the pool's.

    Only under OpenMP, where the setting belongs to the calling thread; other backends would warn.
    """
    if not torch.backends.openmp.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of single-threaded workers; torch kernels release the GIL, so they run in parallel.

    Under OpenMP each worker limits its own intra-op parallelism to one thread: otherwise every kernel
    it runs would start an OpenMP team of its own and the teams would fight over the cores. The limit
    is per thread, but setting it also changes the process-wide value that new threads start from, so
    the caller's value is set again once every worker has started.
    """
    if not torch.backends.openmp.is_available():
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmd-optim")

    def single_threaded() -> None:
        torch.get_num_threads()  # this thread's own initialisation first, so that the limit sticks
        torch.set_num_threads(1)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmd-optim", initializer=single_threaded)
    started = threading.Barrier(workers + 1)  # every worker blocks in it, so all of them start now
    for _ in range(workers):
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(threads)
    return pool
