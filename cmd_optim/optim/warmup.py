"""The warm-up: the base optimizer trains every parameter, and the tracked ones are recorded."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import SnapshotBuffer
from ..core.snapshots import open_saved
from ._params import tensor_bytes
from .phase import Setup, guarded_step

__all__ = ["WarmupPhase"]


class WarmupPhase:
    """Ordinary training with the base optimizer, exactly as it would run alone.

    A snapshot of the tracked parameters is taken at step 0 and every ``snapshot_every`` steps up to the
    switch, into a :class:`SnapshotBuffer` of ``setup.num_snapshots`` rows (in memory, or in a file in
    ``snapshot_dir``; a state_dict then names the file instead of holding the snapshots). Over the last
    ``setup.row_window`` steps it also marks the rows (first dimension) of each tracked matrix that received a
    gradient (``touched_rows``, one bool per row), for a reduction that freezes sparsely used tables.
    """

    name = "warmup"
    reduced = False

    def __init__(self, setup: Setup, optimizer: torch.optim.Optimizer | None = None,
                 snapshots: SnapshotBuffer | None = None, touched_rows: list[torch.Tensor] | None = None) -> None:
        self.setup = setup
        if optimizer is None:
            optimizer = setup.base_on_copies()
            setup.adopt_groups(optimizer)
        self.optimizer = optimizer
        if snapshots is None and setup.record_snapshots:
            snapshots = setup.snapshot_buffer()
            snapshots.record(setup.local_tracked())
        self.snapshots = snapshots
        self.touched_rows = touched_rows

    def step(self, loss, closure: Callable | None) -> bool:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.setup.all_finite(p.grad for p in params):
            return False
        return guarded_step(self.optimizer, loss, closure, params)

    def after_step(self, steps_taken: int) -> None:
        if (self.snapshots is not None and steps_taken % self.setup.snapshot_every == 0
                and steps_taken <= self.setup.switch_after):
            self.snapshots.record(self.setup.local_tracked())
        if self.setup.switch_after - self.setup.row_window < steps_taken <= self.setup.switch_after:
            self._mark_rows()

    @torch.no_grad()
    def _mark_rows(self) -> None:
        watched = self.setup.watched_matrices
        if self.touched_rows is None:
            self.touched_rows = [torch.zeros(p.shape[0], dtype=torch.bool, device=p.device) for p in watched]
        for p, rows in zip(watched, self.touched_rows):
            if p.grad is not None:
                rows |= torch.linalg.vector_norm(p.grad.reshape(p.shape[0], -1), 1, dim=1) > 0

    def trainable_dims(self) -> int:
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad)

    def state_bytes(self) -> int:
        return tensor_bytes(self.optimizer.state) + (self.snapshots.nbytes if self.snapshots is not None else 0)

    def extra_state(self) -> dict:
        """The snapshots so far (under FSDP2: one DTensor per parameter, (snapshots, *shape), this rank's rows)."""
        rows = {} if self.touched_rows is None else {"touched_rows": [r.clone() for r in self.touched_rows]}
        if self.snapshots is None:
            return rows
        saved = self.snapshots.saved()
        sharding = self.setup.sharding
        if sharding is not None and isinstance(saved, torch.Tensor):
            shapes = [t.shape for t in self.setup.local_tracked()]
            pieces = saved.split([s.numel() for s in shapes], dim=1)
            saved = [sharding.global_view(piece.reshape(len(saved), *shape), index, dim=1)
                     for index, (piece, shape) in enumerate(zip(pieces, shapes))]
        return {"snapshots": saved, **rows}

    @classmethod
    def load(cls, setup: Setup, envelope: dict, extra: dict, steps_taken: int) -> WarmupPhase:
        """A warm-up phase from saved state, built beside the live one: nothing live is touched."""
        rows = _touched_rows(setup, extra.get("touched_rows"))
        buffer = _saved_snapshots(setup, extra, steps_taken) if setup.record_snapshots else None
        try:
            optimizer = setup.base_on_copies()
            load_base_state(optimizer, envelope)
        except Exception:
            if buffer is not None:
                buffer.release()
            raise
        return cls(setup, optimizer, buffer, rows)

    def adopt(self) -> None:
        """Called once this phase replaces the live one: step on the visible group dicts."""
        self.setup.adopt_groups(self.optimizer)


def _saved_snapshots(setup: Setup, extra: dict, steps_taken: int) -> SnapshotBuffer:
    """A buffer holding the warm-up state_dict's snapshots, checked against the step count."""
    if "snapshots" not in extra:
        raise ValueError("the warm-up state_dict has no 'snapshots' (it was saved with a reduction that "
                         "needs none)")
    snapshots = extra["snapshots"]
    if isinstance(snapshots, list):  # saved under FSDP2: this rank's rows of every parameter's trajectory
        snapshots = torch.cat([setup.local(t).reshape(t.shape[0], -1) for t in snapshots], dim=1)
    snapshots = open_saved(snapshots)
    expected = min(steps_taken, setup.switch_after) // setup.snapshot_every + 1
    if len(snapshots.shape) != 2 or snapshots.shape[0] != expected:
        raise ValueError(f"the warm-up state_dict holds {snapshots.shape[0]} snapshots after {steps_taken} steps; "
                         f"with snapshot_every={setup.snapshot_every} this optimizer expects {expected}")
    buffer = setup.snapshot_buffer()
    try:
        buffer.load(snapshots)
    except Exception:
        buffer.release()
        raise
    return buffer


def _touched_rows(setup: Setup, saved) -> list[torch.Tensor] | None:
    """The saved row marks, checked against this optimizer's matrices (None if none were saved)."""
    if saved is None:
        return None
    watched = setup.watched_matrices
    if not isinstance(saved, list) or len(saved) != len(watched) or not all(
            isinstance(r, torch.Tensor) and r.dtype == torch.bool and r.shape == (p.shape[0],)
            for r, p in zip(saved, watched)):
        raise ValueError(f"the warm-up state_dict's 'touched_rows' do not fit this model's {len(watched)} "
                         "matrices")
    return [r.to(p.device).clone() for r, p in zip(saved, watched)]


def load_base_state(optimizer: torch.optim.Optimizer, envelope: dict) -> None:
    """``optimizer.load_state_dict(envelope)``, after checking that per-parameter state tensors have their
    parameter's shape (torch checks only the counts)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = envelope.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("the state_dict's 'state' is not a dict")
    for index, entry in state.items():
        if isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict):
            p = params[index]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim == p.ndim and value.ndim and value.shape != p.shape:
                    raise ValueError(f"the state_dict's {key!r} of parameter {index} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(p.shape)}: it belongs to another model")
    optimizer.load_state_dict(envelope)
