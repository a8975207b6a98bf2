"""The mode map's two passes through the C extension (``_native``), over the packed blocks' memory.

Each packed member is handed to the C kernel as a pointer into its block's slopes and bins and a length,
with its gradient or weight: no gather into scratch buffers, one pass each way, OpenMP threads (the
caller's ``torch.get_num_threads()``). Gradients may be float32, bfloat16 or float16; weights float32.
"""

from __future__ import annotations

import torch

from . import _native
from .packed import PackedBlocks

__all__ = ["DTYPE_CODES", "lift_", "mode_sums", "supports"]

#: The C kernels' gradient dtype codes.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(tensors) -> bool:
    """Whether the C kernels take these gradients or weights (CPU, a dtype they know)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPE_CODES) for t in tensors)


@torch.no_grad()
def mode_sums(packed: PackedBlocks, grads, num_groups: int) -> torch.Tensor:
    """As :func:`cmd_optim.core.kernels.packed.mode_sums`: (num_groups * M,) float64."""
    bins_per_group = packed.num_modes * packed.lanes
    out = torch.zeros(num_groups, bins_per_group, dtype=torch.float64)
    threads = torch.get_num_threads()
    for block, offset, size, grad in _pieces(packed, grads):
        grad = grad.reshape(-1).contiguous()
        _native.mode_sums(block.slopes.data_ptr() + 4 * offset, grad.data_ptr(), DTYPE_CODES[grad.dtype],
                          block.bins.data_ptr() + offset, size, bins_per_group, out[block.group].data_ptr(), threads)
    return out.view(num_groups, packed.num_modes, packed.lanes).sum(2).reshape(-1)


@torch.no_grad()
def lift_(packed: PackedBlocks, targets, delta: torch.Tensor) -> None:
    """As :func:`cmd_optim.core.kernels.packed.lift_`; targets are contiguous float32 (numel,) views or None."""
    table = delta.view(-1, packed.num_modes).to(torch.float32).repeat_interleave(packed.lanes, dim=1).contiguous()
    threads = torch.get_num_threads()
    for block, offset, size, target in _pieces(packed, targets):
        _native.lift(target.data_ptr(), block.slopes.data_ptr() + 4 * offset, block.bins.data_ptr() + offset,
                     table[block.group].data_ptr(), size, threads)


def _pieces(packed: PackedBlocks, tensors):
    """``(block, offset in the block, size, tensor)`` of every packed member with a tensor and elements."""
    for block in packed.blocks:
        offset = 0
        for member, size in zip(block.members, block.sizes):
            if tensors[member] is not None and size:
                yield block, offset, size, tensors[member]
            offset += size
