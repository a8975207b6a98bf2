"""The small public object through which a communication hook and a CMDOptimizer meet.

Neither imports the other (as torch's PostLocalSGD hook and optimizer do not): the hook asks the
exchange whether the mode phase is on, turns a bucket's gradients into their contribution to the mode
gradient, and hands the reduced sums back; the optimizer attaches its mode map at the switch and takes
the sums at its next step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core import ModeMap

__all__ = ["ModeExchange"]


class ModeExchange:
    """Shared by a CMDOptimizer (``optimizer.mode_exchange``) and a communication hook.

    ``active`` is False during the warm-up and with reductions that train every parameter; a hook then
    all-reduces gradients as usual. When it is True, per bucket :meth:`mode_sums` gives the (C,) float64
    contribution of the bucket's mapped parameters, the hook all-reduces it (averaged over the ranks) and
    calls :meth:`deposit`. Parameters for which :meth:`is_mapped` is False keep their gradients.
    """

    def __init__(self, mapped: Sequence[torch.Tensor]) -> None:
        self._index = {p: i for i, p in enumerate(mapped)}
        self._map: ModeMap | None = None
        self._pending: dict[int, torch.Tensor] = {}
        self.hooked = False

    # ------------------------------------------------------------------ the hook's side
    @property
    def active(self) -> bool:
        return self._map is not None

    @property
    def num_coefficients(self) -> int:
        return self._map.num_coefficients if self._map is not None else 0

    def is_mapped(self, param: torch.Tensor) -> bool:
        return self.active and param in self._index

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

    def mark_hooked(self) -> None:
        """Called by a hook at registration: from now on every mode-phase step needs deposited sums."""
        self.hooked = True

    # ------------------------------------------------------------------ the optimizer's side
    def attach(self, mode_map: ModeMap | None) -> None:
        self._map = mode_map
        self._pending = {}

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
        sums = sum(self._pending[key].double() for key in sorted(self._pending))
        self._pending = {}
        return sums

    def clear(self) -> None:
        self._pending = {}
