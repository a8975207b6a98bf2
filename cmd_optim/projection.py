"""The reduced map of CMD training: parameters move only along their modes.

After the warm-up, parameter ``i`` of mode ``m`` moves as ``w_i += u_i * delta_psi[m]``, where ``u_i`` is
its CMD slope ``a_i`` divided by the root-mean-square slope of its mode (so a unit move of a mode
coefficient moves a typical member by one unit, as one step of a coordinate-wise optimizer would), and
clipped to ``[-max_coefficient, max_coefficient]`` (members whose reference barely moves would
otherwise get slopes in the thousands). Each parameter group has its own M mode coefficients, so
per-group hyperparameters keep their meaning.

Per parameter the map stores ``u`` (float32) and its mode's histogram bin (uint8): 5 bytes.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from .decomposition import Decomposition

#: Largest |u| (slopes relative to their mode's RMS slope) a parameter may keep.
MAX_COEFFICIENT = 10.0
#: Elements per slice in ``project`` and ``apply`` (each worker thread has 2 scratch buffers of this size, 2 MiB).
CHUNK = 1 << 18
#: Below this many slices (1M elements) one thread does the work: handing out costs more.
PARALLEL_SLICES = 4
#: Interleaved histogram bins per mode (fewer when M > 32, so that the bin fits in a byte).
LANES = 8


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
        self.coefficients = list(coefficients)
        self.groups = list(groups)
        self.num_modes = num_modes
        self.num_groups = num_groups
        # Squared norm of each (group, mode) direction: dividing by it makes the mode step the
        # least-squares projection of the full step, whatever the scale of u.
        norms = torch.zeros(num_groups, num_modes, dtype=torch.float64)
        for u, mode, group in zip(self.coefficients, modes, self.groups):
            norms[group] += torch.zeros(num_modes, dtype=torch.float64).index_add_(
                0, mode.reshape(-1).long().cpu(), u.reshape(-1).double().square().cpu())
        self.active = norms > 0  # (group, mode) pairs that move some parameter
        self.direction_norms = norms.float().clamp_min(torch.finfo(torch.float32).tiny).to(self.device)
        # Each parameter keeps one byte: its histogram bin, mode * lanes + (flat index % lanes). Spreading
        # a mode over interleaved bins keeps runs of one mode (whole rows usually share one) from
        # serialising the histogram in ``project`` on a single bin.
        self.lanes = max(1, min(LANES, 256 // num_modes))
        self.bins = [(mode.reshape(-1) * self.lanes + _lanes(mode.numel(), self.lanes, mode.device)).view_as(mode)
                     for mode in modes]
        self._flat_coefficients = [u.view(-1) for u in self.coefficients]
        self._flat_bins = [b.view(-1) for b in self.bins]
        self._slices = [(tensor, start, min(start + CHUNK, u.numel()))
                        for tensor, u in enumerate(self._flat_coefficients) for start in range(0, u.numel(), CHUNK)]
        # Serial kernels (the histogram, the gather) share the CPU cores through a thread pool; on an
        # accelerator one thread queues everything.
        parallel = self.device.type == "cpu" and len(self._slices) >= PARALLEL_SLICES
        self._workers = max(1, min(torch.get_num_threads(), len(self._slices))) if parallel else 1
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

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
        slices = [s for s in self._slices if grads[s[0]] is not None]  # a DDP bucket holds a few tensors

        def work(worker: int) -> torch.Tensor:
            out = torch.zeros(self.num_groups, self.num_modes, dtype=torch.float64, device=self.device)
            values, index = self._scratch(worker)
            for tensor, start, end in slices[worker::self._workers]:
                u, bins = self._flat_coefficients[tensor][start:end], self._flat_bins[tensor][start:end]
                product = torch.mul(u, grads[tensor][start:end], out=values[: end - start])
                out[self.groups[tensor]] += self._sum_by_bin(product, bins, index)
            return out

        return sum(self._run(work))

    def apply(self, params, delta: torch.Tensor) -> None:
        """Move each parameter by ``u * delta[group, mode]``; ``delta`` is (num_groups, M).

        A parameter without a gradient in this step is left alone, as a base optimizer would.
        """
        table = delta.to(self.device, torch.float32).repeat_interleave(self.lanes, dim=1)  # per bin
        flat = [p.view(-1) if p.grad is not None else None for p in params]

        def work(worker: int) -> None:
            values, index = self._scratch(worker)
            for tensor, start, end in self._slices[worker::self._workers]:
                if flat[tensor] is None:
                    continue
                bins = index[: end - start].copy_(self._flat_bins[tensor][start:end])
                step = torch.index_select(table[self.groups[tensor]], 0, bins, out=values[: end - start])
                flat[tensor][start:end].addcmul_(step, self._flat_coefficients[tensor][start:end])

        self._run(work)

    def _sum_by_bin(self, values: torch.Tensor, bins: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(M,) float64 sums of ``values`` per mode; ``index`` is int32 scratch space.

        On the CPU a histogram (``bincount``); on an accelerator ``bincount`` would synchronise with the
        host, so atomics are used instead.
        """
        size = self.num_modes * self.lanes
        if values.device.type == "cpu":
            sums = torch.bincount(bins, weights=values, minlength=size)
        else:
            sums = torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(
                0, index[: len(bins)].copy_(bins), values.double())
        return sums.view(self.num_modes, self.lanes).sum(1)

    def _scratch(self, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-worker float32 and int32 buffers of ``CHUNK`` elements, made on first use."""
        while len(self._buffers) <= worker:
            self._buffers.append((torch.empty(CHUNK, device=self.device),
                                  torch.empty(CHUNK, dtype=torch.int32, device=self.device)))
        return self._buffers[worker]

    def _run(self, work) -> list:
        """``work(worker)`` for every worker; each owns the slices ``worker::workers``, so the result
        does not depend on thread timing."""
        def no_grad_work(worker: int):
            with torch.no_grad():  # grad mode is thread-local
                return work(worker)

        if self._workers == 1:
            return [no_grad_work(0)]
        return list(_pool(self._workers).map(no_grad_work, range(self._workers)))

    @property
    def device(self) -> torch.device:
        return self.coefficients[0].device if self.coefficients else torch.device("cpu")

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


def _lanes(n: int, lanes: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[0, 1, ..., lanes - 1, 0, 1, ...]`` of length ``n``."""
    return (torch.arange(n, dtype=torch.int32, device=device) % lanes).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool; torch kernels release the GIL, so the workers run in parallel."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmd-optim")
