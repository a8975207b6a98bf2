"""Recording the warm-up trajectory of a list of parameters."""

from __future__ import annotations

import torch

from .layout import FlatLayout

__all__ = ["SnapshotBuffer"]


class SnapshotBuffer:
    """Preallocated (capacity, N) storage for flattened snapshots of ``params``.

    Memory: ``capacity * N * itemsize`` bytes on ``device`` (float32: 4 bytes, float16: 2), allocated
    at construction and released by :meth:`release`.
    """

    def __init__(self, params, capacity: int, device="cpu", dtype=torch.float32) -> None:
        self.params = list(params)
        self.layout = FlatLayout(self.params)
        self.data = torch.empty(capacity, self.layout.numel, device=device, dtype=dtype)
        self.count = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @torch.no_grad()
    def record(self, tensors=None) -> None:
        """Append the current values of ``params`` (or of ``tensors``, shaped like them). A value the snapshot
        dtype cannot hold (a finite weight beyond float16's 65504) raises here, not after the warm-up."""
        if self.count == self.capacity:
            raise RuntimeError(f"snapshot buffer is full ({self.count} snapshots)")
        tensors = self.params if tensors is None else list(tensors)
        row = self.layout.flatten(tensors, out=self.data[self.count])
        if self.data.dtype.itemsize < 4 and not bool(torch.isfinite(row).all()):
            for p in tensors:
                if torch.isfinite(p).all() and not torch.isfinite(p.detach().to(self.data.dtype)).all():
                    raise OverflowError(
                        f"a parameter of shape {tuple(p.shape)} holds a value beyond "
                        f"snapshot_dtype={self.data.dtype}'s range (largest |w| {float(p.detach().abs().max()):.4g}); "
                        "use snapshot_dtype=torch.float32")
            raise ValueError("a tracked parameter holds a non-finite value")
        self.count += 1

    def load(self, trajectory: torch.Tensor) -> None:
        """Take over the first ``len(trajectory)`` snapshots from a saved (count, N) trajectory."""
        if trajectory.ndim != 2 or trajectory.shape[1] != self.layout.numel or len(trajectory) > self.capacity:
            raise ValueError(f"saved snapshots have shape {tuple(trajectory.shape)}; this optimizer records up to "
                             f"({self.capacity}, {self.layout.numel})")
        self.data[: len(trajectory)] = trajectory
        self.count = len(trajectory)

    def trajectory(self) -> torch.Tensor:
        """The recorded (count, N) trajectory (a view, not a copy)."""
        return self.data[: self.count]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def release(self) -> None:
        self.data = self.data.new_empty(0, self.data.shape[1])
