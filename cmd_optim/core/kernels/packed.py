"""Fast paths of the mode map's two passes, in stock PyTorch: packed blocks with interleaved histogram lanes.

The slopes and modes of the mapped parameters live in flat blocks. A large parameter has a block of its
own, worked on in slices of ``chunk`` elements; parameters under ``pack_below`` elements of one group
and device share a block of at most ``chunk``, so that a model of many small tensors costs a few kernels
per step rather than a few per tensor. Each element stores one byte, its histogram bin
``mode * lanes + position % lanes``: spreading a mode over interleaved bins keeps runs of one mode (whole
rows usually share one) from serialising ``bincount`` on a single bin (5x slower, measured).

:func:`mode_sums` and :func:`lift_` compute what :meth:`cmd_optim.core.ModeMap.mode_sums_reference` and
:meth:`~cmd_optim.core.ModeMap.lift_reference` compute; the tests hold them to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CHUNK", "LANES", "PACK_BELOW", "PackedBlocks", "lift_", "mode_sums"]

#: Elements per work item (two scratch buffers of this size, 2 MiB).
CHUNK = 1 << 18
#: Parameters with fewer elements than this are packed into shared blocks of at most ``CHUNK``.
PACK_BELOW = CHUNK // 4
#: Interleaved histogram bins per mode (fewer when M > 32, so that a bin fits in a byte).
LANES = 8


@dataclass
class _Block:
    """Slopes and bins of consecutive mapped parameters of one group and device, stored flat.

    ``members`` are the parameters' indices, ``sizes`` their element counts (in block order).
    """

    slopes: torch.Tensor  # (n,) float32
    bins: torch.Tensor  # (n,) uint8
    group: int
    members: list[int]
    sizes: list[int]


class PackedBlocks:
    """The blocks of one mode map, over flat per-element slopes and modes, with per-parameter views.

    Args:
        slopes: (N,) float32, the slopes of the mapped parameters laid end to end (their logical order).
        modes: (N,) uint8, their modes in ``[0, num_modes)``; turned into histogram bins in place.
        shapes, groups, devices: each mapped parameter's shape, parameter-group index and device.
        num_modes: M (at most 256).
        chunk, pack_below, lanes: the layout knobs (module defaults ``CHUNK``, ``PACK_BELOW``, ``LANES``).

    The blocks are slices of ``slopes`` and ``modes`` (no copies) where a parameter lives on their device;
    the map then takes 5 bytes per parameter in all.
    """

    def __init__(self, slopes: torch.Tensor, modes: torch.Tensor, shapes, groups, devices, num_modes: int, *,
                 chunk: int = CHUNK, pack_below: int = PACK_BELOW, lanes: int = LANES) -> None:
        self.groups = list(groups)
        self.num_modes = num_modes
        self.chunk = chunk
        self.lanes = max(1, min(lanes, 256 // num_modes))
        sizes = [math.prod(shape) for shape in shapes]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        self.blocks = []
        for members in self._packing(sizes, devices, pack_below):
            start, stop = offsets[members[0]], offsets[members[-1] + 1]
            device = devices[members[0]]
            self.blocks.append(_Block(slopes[start:stop].to(device), self._bins(modes[start:stop].to(device)),
                                      self.groups[members[0]], members, [sizes[i] for i in members]))
        self.slopes, self.bins = [None] * len(sizes), [None] * len(sizes)
        for block in self.blocks:  # per-parameter views, shaped like the parameters
            for index, u, bins in zip(block.members, block.slopes.split(block.sizes), block.bins.split(block.sizes)):
                self.slopes[index] = u.view(shapes[index])
                self.bins[index] = bins.view(shapes[index])
        self.items = [(block, start, min(start + chunk, len(block.slopes)))
                      for block in self.blocks for start in range(0, len(block.slopes), chunk)]
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _packing(self, sizes, devices, pack_below: int) -> list[list[int]]:
        """Parameter indices per block: a large parameter alone, runs of small ones (one group and
        device) up to ``chunk`` elements together."""
        blocks, pack, packed, key = [], [], 0, None
        for index, n in enumerate(sizes):
            if n >= pack_below:
                if pack:
                    blocks.append(pack)
                    pack, packed = [], 0
                blocks.append([index])
                continue
            if pack and ((self.groups[index], devices[index]) != key or packed + n > self.chunk):
                blocks.append(pack)
                pack, packed = [], 0
            pack.append(index)
            packed += n
            key = (self.groups[index], devices[index])
        return blocks + [pack] if pack else blocks

    def _bins(self, modes: torch.Tensor) -> torch.Tensor:
        """``mode * lanes + position % lanes``, in place, a chunk at a time (``chunk`` is a multiple of the lanes)."""
        if not len(modes):
            return modes
        pattern = torch.arange(self.lanes, dtype=torch.uint8, device=modes.device).repeat(-(-self.chunk // self.lanes))
        for start in range(0, len(modes), self.chunk):
            piece = modes[start:start + self.chunk]
            piece.mul_(self.lanes).add_(pattern[: len(piece)])
        return modes

    def modes(self) -> list[torch.Tensor]:
        """The mode of every mapped parameter (uint8, shaped like it), decoded from its bins."""
        return [torch.div(b, self.lanes, rounding_mode="floor") for b in self.bins]

    def scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 and int32 buffers of ``chunk`` elements, made on first use."""
        if self._scratch is None:
            device = self.blocks[0].slopes.device if self.blocks else torch.device("cpu")
            self._scratch = (torch.empty(self.chunk, device=device),
                             torch.empty(self.chunk, dtype=torch.int32, device=device))
        return self._scratch


@torch.no_grad()
def mode_sums(packed: PackedBlocks, grads, num_groups: int) -> torch.Tensor:
    """``sum_i u_i g_i`` per (group, mode), (num_groups * M,) float64; a None gradient counts as zero."""
    grads = [None if g is None else g.reshape(-1) for g in grads]
    items = packed.items
    if any(g is None for g in grads):  # a DDP bucket holds a few parameters
        items = [item for item in items if any(grads[i] is not None for i in item[0].members)]
    bins_per_group = packed.num_modes * packed.lanes
    device = packed.blocks[0].slopes.device if packed.blocks else torch.device("cpu")
    sums = torch.zeros(num_groups, bins_per_group, dtype=torch.float64, device=device)
    values, index = packed.scratch()
    for block, start, end in items:
        product = values[: end - start]
        if len(block.members) == 1:
            torch.mul(block.slopes[start:end], grads[block.members[0]][start:end], out=product)
        else:
            _gather(grads, block, product)
            product.mul_(block.slopes)
        bins = block.bins[start:end]
        if product.device.type == "cpu":
            sums[block.group].add_(torch.bincount(bins, weights=product, minlength=bins_per_group))
        else:  # bincount would synchronise with the host; atomics instead
            sums[block.group].index_add_(0, index[: len(bins)].copy_(bins), product.double())
    return sums.view(num_groups, packed.num_modes, packed.lanes).sum(2).reshape(-1)


@torch.no_grad()
def lift_(packed: PackedBlocks, targets, delta: torch.Tensor) -> None:
    """Add ``u * delta[group, mode]`` to each flat target (a contiguous (numel,) view, or None to skip);
    ``delta`` is (num_groups * M,)."""
    table = delta.view(-1, packed.num_modes).to(torch.float32).repeat_interleave(packed.lanes, dim=1)  # per bin
    values, index = packed.scratch()
    table = table.to(values.device)
    for block, start, end in packed.items:
        members = [targets[i] for i in block.members]
        if all(t is None for t in members):
            continue
        bins = index[: end - start].copy_(block.bins[start:end])
        step = torch.index_select(table[block.group], 0, bins, out=values[: end - start])
        if len(members) == 1:
            members[0][start:end].addcmul_(step, block.slopes[start:end])
            continue
        pieces = step.mul_(block.slopes).split(block.sizes)
        pairs = [(t, s) for t, s in zip(members, pieces) if t is not None]
        torch._foreach_add_([t for t, _ in pairs], [s.to(t.dtype) for t, s in pairs])


def _gather(grads, block: _Block, out: torch.Tensor) -> None:
    """Concatenate the flat gradients of a packed block into ``out``, zeros where a gradient is None."""
    pieces = [grads[i] for i in block.members]
    if all(g is not None for g in pieces):
        torch.cat(pieces, out=out)
        return
    for g, piece in zip(pieces, out.split(block.sizes)):
        if g is None:
            piece.zero_()
        else:
            piece.copy_(g)
