"""The mode map's two passes as Triton kernels, for CUDA devices (tested on the CPU with ``TRITON_INTERPRET=1``).

``mode_sums``: each program reads a block of slopes, gradients and bins, reduces the products per mode in
registers and adds each mode's block sum with one atomic (not one per element: the stock path's
``index_add_`` sends every element's product to one of M x lanes addresses). ``lift``: one fused pass,
``w += u * table[mode]``. One launch per mapped parameter (the packed blocks' members), not one per
256K-element slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedBlocks

__all__ = ["BLOCK", "lift_", "mode_sums"]

#: Elements per program.
BLOCK = 1024


@triton.jit
def _mode_sums_kernel(u_ptr, g_ptr, bins_ptr, out_ptr, n, LANES: tl.constexpr, MODES: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    inside = offsets < n
    u = tl.load(u_ptr + offsets, mask=inside, other=0.0)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    mode = tl.load(bins_ptr + offsets, mask=inside, other=0).to(tl.int32) // LANES
    product = u * g
    for m in tl.static_range(MODES):
        tl.atomic_add(out_ptr + m, tl.sum(tl.where(mode == m, product, 0.0), axis=0))


@triton.jit
def _lift_kernel(w_ptr, u_ptr, bins_ptr, table_ptr, n, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    inside = offsets < n
    u = tl.load(u_ptr + offsets, mask=inside, other=0.0)
    mode = tl.load(bins_ptr + offsets, mask=inside, other=0).to(tl.int32) // LANES
    step = tl.load(table_ptr + mode, mask=inside, other=0.0)
    w = tl.load(w_ptr + offsets, mask=inside, other=0.0)
    tl.store(w_ptr + offsets, w + u * step, mask=inside)


def _members(packed: PackedBlocks):
    """(block, member index, start, size) of every mapped parameter."""
    for block in packed.blocks:
        start = 0
        for member, size in zip(block.members, block.sizes):
            yield block, member, start, size
            start += size


@torch.no_grad()
def mode_sums(packed: PackedBlocks, grads, num_groups: int) -> torch.Tensor:
    """As :func:`cmd_optim.core.kernels.packed.mode_sums`: (num_groups * M,) (float32 per-block sums, added in
    float64 per parameter)."""
    device = packed.blocks[0].slopes.device if packed.blocks else torch.device("cpu")
    out = torch.zeros(num_groups, packed.num_modes, dtype=torch.float64, device=device)
    scratch = torch.zeros(packed.num_modes, dtype=torch.float32, device=device)
    for block, member, start, size in _members(packed):
        grad = grads[member]
        if grad is None or not size:
            continue
        scratch.zero_()
        _mode_sums_kernel[(triton.cdiv(size, BLOCK),)](
            block.slopes[start:start + size], grad.reshape(-1).contiguous(), block.bins[start:start + size], scratch,
            size, LANES=packed.lanes, MODES=packed.num_modes, BLOCK_SIZE=BLOCK)
        out[block.group] += scratch.double()
    return out.reshape(-1)


@torch.no_grad()
def lift_(packed: PackedBlocks, targets, delta: torch.Tensor) -> None:
    """As :func:`cmd_optim.core.kernels.packed.lift_`; targets are contiguous float32 (numel,) views or None."""
    if not packed.blocks:
        return
    table = delta.view(-1, packed.num_modes).to(packed.blocks[0].slopes.device, torch.float32).contiguous()
    for block, member, start, size in _members(packed):
        target = targets[member]
        if target is None or not size:
            continue
        _lift_kernel[(triton.cdiv(size, BLOCK),)](target, block.slopes[start:start + size],
                                                  block.bins[start:start + size], table[block.group], size,
                                                  LANES=packed.lanes, BLOCK_SIZE=BLOCK)
