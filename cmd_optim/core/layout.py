"""Where each of a list of tensors sits in one flat vector of their elements."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["FlatLayout"]


class FlatLayout:
    """Sizes and offsets of ``tensors`` laid end to end (in logical, row-major element order).

    ``offsets`` has one more entry than ``sizes``: tensor ``k`` occupies ``[offsets[k], offsets[k + 1])``
    of a flat vector of ``numel`` elements.
    """

    def __init__(self, tensors: Iterable[torch.Tensor] | None = None, sizes: Sequence[int] | None = None) -> None:
        self.sizes = [int(s) for s in sizes] if sizes is not None else [t.numel() for t in tensors]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.sizes)

    def ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every tensor."""
        return list(zip(self.offsets, self.offsets[1:]))

    def flatten(self, tensors: Iterable[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensors' elements as one (numel,) vector, into ``out`` if given (cast to its dtype)."""
        pieces = [t.detach().reshape(-1) for t in tensors]
        if out is None:
            return torch.cat(pieces)
        for piece, (start, stop) in zip(pieces, self.ranges()):
            out[start:stop].copy_(piece)
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (numel,), one 1-D piece per tensor."""
        return list(flat.split(self.sizes))

    def locate(self, index: torch.Tensor) -> list[tuple[int, int]]:
        """``(tensor, position inside it)`` of each flat index in ``index``."""
        bounds = torch.tensor(self.offsets[1:])
        owners = torch.searchsorted(bounds, index.cpu(), right=True)
        return [(int(k), int(i) - self.offsets[int(k)]) for k, i in zip(owners, index.cpu())]
