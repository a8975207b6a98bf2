"""The small public object through which a communication hook and a CMDOptimizer meet.

Neither imports the other (as torch's PostLocalSGD hook and optimizer do not): the hook asks the
exchange what the reduced phase needs of a bucket's gradients, all-reduces that, and hands it back; the
optimizer's phase attaches what it reads at the switch and checks at its next step that it was exchanged.

Three reduced phases use it:

- the mode reduction attaches its mode map (:meth:`ModeExchange.attach`): a bucket sends its contribution to
  the mode gradient (:meth:`ModeExchange.mode_sums`) and the gradients of its free parameters;
- the packed gradual reduction attaches a *packing* (:meth:`ModeExchange.attach_packing`, any object with
  ``positions_of(param) -> index tensor | None`` and ``mode_sums_of(params, grads) -> (M,) tensor | None``): a
  bucket sends the gradients of its parameters' live elements only, and the M mode sums of its embedded
  elements' gradients when the packing gives them (:meth:`ModeExchange.pack`); the live elements are written
  back averaged and the sums deposited (:meth:`ModeExchange.unpack`), for the phase's next step
  (:meth:`ModeExchange.check_exchanged`);
- the low-rank reduction attaches its *subspaces* (:meth:`ModeExchange.attach_subspaces`, any object with
  ``map`` (a :class:`~cmd_optim.core.SubspaceMap`), ``subspace_of(param) -> index | None``, ``refresh_due``
  and ``same_rounding()``): a hook reads a projected matrix's core gradient (:meth:`ModeExchange.project`, r x D
  or D x r), compresses it, and writes back the lifted average (:meth:`ModeExchange.lift`, m x n). On a step
  where the bases are renewed (:attr:`ModeExchange.refresh_due`) it leaves this rank's own gradient
  (:meth:`ModeExchange.stash`), from which the phase finds the new bases (the first rank's are taken by
  all); a core-shaped tensor the hook keeps across steps follows the new bases through
  :meth:`ModeExchange.rebase`, and is stale once :attr:`ModeExchange.attachments` has grown (a new phase:
  the switch, or a loaded state). A hook calls :meth:`ModeExchange.exchanged` once a bucket is reduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core import ModeMap

__all__ = ["ModeExchange"]


class ModeExchange:
    """Shared by a CMDOptimizer (``optimizer.mode_exchange``) and a communication hook.

    ``active`` is False during the warm-up; a hook then all-reduces gradients as usual. In the mode phase,
    per bucket :meth:`mode_sums` gives the (C,) float64 contribution of the bucket's mapped parameters, the
    hook all-reduces it (averaged over the ranks) and calls :meth:`deposit`. Parameters for which
    :meth:`is_mapped` is False keep their gradients. :attr:`packed` and :attr:`low_rank` say when the other
    two phases are live (see the module).
    """

    def __init__(self, mapped: Sequence[torch.Tensor]) -> None:
        self._index = {p: i for i, p in enumerate(mapped)}
        self._map: ModeMap | None = None
        self._packing = None
        self._subspaces = None
        self._pending: dict[int, torch.Tensor | None] = {}
        self._stash: dict[int, torch.Tensor] = {}
        self._rotations: dict[int, torch.Tensor] = {}
        self.attachments = 0  # subspaces attached so far: a hook's core-shaped state from an earlier count is stale
        self.hooked = False
        self.process_group = None  # the registered hook's (None: the default group)

    # ------------------------------------------------------------------ the hook's side
    @property
    def active(self) -> bool:
        """Whether a reduced phase is live that a hook sends less for than the whole gradient."""
        return self._map is not None or self._packing is not None or self._subspaces is not None

    @property
    def packed(self) -> bool:
        """True in the packed gradual phase: a hook sends :meth:`pack` and calls :meth:`unpack`."""
        return self._packing is not None

    def pack(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """One bucket's payload in the packed gradual phase: each parameter's gradient at its live elements (the
        whole gradient of a free parameter), concatenated, then the packing's mode sums if it gives them."""
        pieces = []
        for p, g in zip(params, grads):
            positions = self._packing.positions_of(p)
            pieces.append(g.reshape(-1) if positions is None else g.reshape(-1)[positions.to(g.device)])
        sums = self._packing.mode_sums_of(params, grads)
        if sums is not None:
            pieces.append(sums.to(grads[0].device, grads[0].dtype))
        return torch.cat(pieces) if pieces else grads[0].new_zeros(0)

    def unpack(self, key: int, reduced: torch.Tensor, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor]) -> None:
        """Write the reduced :meth:`pack` payload of bucket ``key`` back into ``grads`` (in place): the live
        elements averaged, the embedded ones 0 (their gradient was not sent); the mode sums after them, if any, are
        deposited."""
        offset = 0
        for p, g in zip(params, grads):
            positions = self._packing.positions_of(p)
            count = g.numel() if positions is None else positions.numel()
            piece = reduced[offset:offset + count]
            if positions is None:
                g.copy_(piece.view_as(g))
            else:
                flat = g.view(-1)
                flat.zero_()
                flat.index_copy_(0, positions.to(g.device).long(), piece.to(g.dtype))
            offset += count
        self._pending[key] = reduced[offset:].double() if offset < reduced.numel() else None

    def exchanged(self, key: int) -> None:
        """Called by a hook once bucket ``key`` is reduced (packed gradual and low-rank phases)."""
        self._pending[key] = None

    @property
    def low_rank(self) -> bool:
        """True in the low-rank phase: a hook compresses the projected matrices' core gradients."""
        return self._subspaces is not None

    def projects(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a projected matrix of the low-rank phase (it has a basis P, d x r)."""
        return self._subspaces is not None and self._subspaces.subspace_of(param) is not None

    def project(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The core gradient of a projected matrix's ``grad``: ``P^T G`` (r, n) or ``G P`` (m, r), float32."""
        return self._subspaces.map.project(self._subspaces.subspace_of(param), grad)

    def core_shape(self, param: torch.Tensor) -> tuple[int, int]:
        """The shape of a projected matrix's core, what :meth:`project` returns: (r, n) or (m, r)."""
        return self._subspaces.map.core_shape(self._subspaces.subspace_of(param))

    def lift(self, param: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """A core-shaped ``low`` as the (m, n) matrix ``P L`` or ``L P^T`` (:meth:`project` recovers it)."""
        return self._subspaces.map.lift(self._subspaces.subspace_of(param), low)

    def rebase(self, param: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """A core-shaped tensor kept across steps (since the last :attr:`attachments`) re-expressed in the
        current basis: rotated through the refreshes since the last call for ``param``."""
        index = self._subspaces.subspace_of(param)
        rotation = self._rotations.pop(index, None)
        return low if rotation is None else self._subspaces.map.rotate(index, low, rotation, second_moment=False)

    @property
    def refresh_due(self) -> bool:
        """Whether the low-rank phase renews its bases at the coming step (from :meth:`stash`-ed gradients)."""
        return self._subspaces is not None and self._subspaces.refresh_due

    def stash(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Leave a copy of this rank's ``grad`` of a projected matrix for the coming refresh."""
        self._stash[self._subspaces.subspace_of(param)] = grad.detach().clone()

    def same_rounding(self):
        """A context in which the low-rank phase's products round alike on every rank (its thread count)."""
        return self._subspaces.same_rounding()

    @property
    def num_coefficients(self) -> int:
        return self._map.num_coefficients if self._map is not None else 0

    def is_mapped(self, param: torch.Tensor) -> bool:
        return self._map is not None and param in self._index

    def mode_sums(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """(C,) float64: ``sum_i u_i g_i`` over the mapped parameters among ``params``."""
        if self._map is None:
            raise RuntimeError("the mode exchange is not active (the optimizer is not in its mode phase)")
        aligned: list[torch.Tensor | None] = [None] * len(self._index)
        for p, g in zip(params, grads):
            index = self._index.get(p)
            if index is not None:
                aligned[index] = g
        return self._map.mode_sums(aligned)

    def deposit(self, key: int, sums: torch.Tensor) -> None:
        """Hand back the reduced sums of bucket ``key`` (already averaged over the ranks)."""
        self._pending[key] = sums

    def mark_hooked(self, process_group=None) -> None:
        """Called by a hook at registration: from now on every mode-phase step needs deposited sums, and the
        optimizer takes the ranks of the hook's ``process_group`` (None: the default group) for replicas."""
        self.hooked, self.process_group = True, process_group

    # ------------------------------------------------------------------ the optimizer's side
    def attach(self, mode_map: ModeMap | None) -> None:
        self._map = mode_map
        self._pending = {}

    def attach_packing(self, packing) -> None:
        """The packed gradual phase's ``positions_of`` (None: detach)."""
        self._packing = packing
        self._pending = {}

    def attach_subspaces(self, subspaces) -> None:
        """The low-rank phase's subspaces (None: detach); see the module."""
        self._subspaces = subspaces
        self._pending, self._stash, self._rotations = {}, {}, {}
        self.attachments += subspaces is not None

    def take_stash(self) -> dict[int, torch.Tensor]:
        """The gradients :meth:`stash`-ed since the last call, by subspace index; then forgets them."""
        stash, self._stash = self._stash, {}
        return stash

    def rotated(self, rotations: dict[int, torch.Tensor]) -> None:
        """After a refresh: each changed basis's rotation ``P_new^T P_old`` (r, r), by subspace index."""
        for index, rotation in rotations.items():
            earlier = self._rotations.get(index)
            self._rotations[index] = rotation if earlier is None else rotation @ earlier

    def check_exchanged(self) -> torch.Tensor | None:
        """In the packed gradual and low-rank phases, before a step: raise if a hook is registered but did not
        exchange the last backward's gradients (the ranks would step on different ones); then forget the buckets.
        Returns the mode sums the buckets deposited, added in bucket order (float64), or None if none did."""
        if self.hooked and (self._packing is not None or self._subspaces is not None) and not self._pending:
            raise RuntimeError(
                "CMDOptimizer.step() found no gradients exchanged by the DDP hook: the last backward did not "
                "synchronise (inside ddp.no_sync(), or not through the DDP-wrapped model)")
        return self._drain()

    def take(self) -> torch.Tensor | None:
        """The deposited sums added in bucket order (the same on every rank), or None without a hook.

        Raises if a hook is registered but nothing was deposited: stepping on this rank's local gradients
        would let the ranks drift apart.
        """
        if not self._pending:
            if self.hooked:
                raise RuntimeError(
                    "CMDOptimizer.step() found no mode gradient from the DDP hook: the last backward did not "
                    "synchronise (inside ddp.no_sync(), or not through the DDP-wrapped model)")
            return None
        return self._drain()

    def _drain(self) -> torch.Tensor | None:
        """The deposited sums added in bucket order (float64; None if no bucket deposited any); forgets them."""
        sums = [self._pending[key].double() for key in sorted(self._pending) if self._pending[key] is not None]
        self._pending = {}
        return sum(sums) if sums else None

    def clear(self) -> None:
        self._pending, self._stash = {}, {}
