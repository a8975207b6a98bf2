"""Recording the warm-up trajectory of a list of parameters."""
from __future__ import annotations

import torch


class SnapshotBuffer:
    """Preallocated (capacity, N) storage for flattened snapshots of ``params``.

    Memory: ``capacity * N * itemsize`` bytes on ``device`` (float32: 4 bytes, float16: 2), allocated
    at construction and released by :meth:`release`.
    """

    def __init__(self, params, capacity: int, device="cpu", dtype=torch.float32):
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.data = torch.empty(capacity, sum(self.sizes), device=device, dtype=dtype)
        self.count = 0

    @torch.no_grad()
    def record(self) -> None:
        if self.count == self.data.shape[0]:
            raise RuntimeError(f"snapshot buffer is full ({self.count} snapshots)")
        row = self.data[self.count]
        offset = 0
        for p, n in zip(self.params, self.sizes):
            row[offset:offset + n].copy_(p.reshape(-1))
            offset += n
        self.count += 1

    def trajectory(self) -> torch.Tensor:
        """The recorded (count, N) trajectory (a view, not a copy)."""
        return self.data[: self.count]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def release(self) -> None:
        self.data = self.data.new_empty(0, self.data.shape[1])
