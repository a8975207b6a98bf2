"""CMD on FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``: DTensors split by rows).

Each rank holds, of every parameter, the rows ``torch.chunk`` gives it (``Shard(0)`` on a one-dimensional
mesh). The warm-up records only this rank's shard. At the switch the sampled columns are chosen by global
index (the same seed gives the same samples on every rank), gathered (an all-reduce of K x T numbers),
clustered identically everywhere; the references' profiles are among them. Each rank then assigns and
fits its own columns. In the mode phase each rank adds its shard's mode sums and one all-reduce of the C
numbers gives every rank the mode gradient; each rank moves its own shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..core import SlopeFit, choose_references, fit_slopes_to_profiles, sample_columns
from ..core._checks import check_int
from ..core.decomposition import Decomposition, decompose_to_profiles

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = None

__all__ = ["Sharding", "is_sharded", "one_mesh", "one_mesh_advice"]


def one_mesh_advice(device_type: str = "cuda") -> str:
    """What to do instead, for a sharding CMDOptimizer cannot serve."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else "world_size"
    return (f"shard over one 1-D mesh: fully_shard(module, mesh=init_device_mesh({device_type!r}, ({world},))) on "
            "every block and the root (fully_shard without a mesh makes that mesh), or train with "
            "DistributedDataParallel (cmd_optim.integrations.ddp.register_cmd_hook)")


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (what FSDP2's fully_shard makes of a parameter)."""
    return DTensor is not None and isinstance(p, DTensor)


def _ranks(mesh) -> list[int]:
    return mesh.mesh.flatten().tolist()


def _members(mesh) -> list[int]:
    return sorted(dist.get_process_group_ranks(mesh.get_group()))


def one_mesh(params):
    """The device mesh of the DTensors among ``params`` (None if there are none), checked to be one 1-D mesh.

    Every ``fully_shard`` call without a mesh makes a DeviceMesh object of its own, so meshes are one when
    they have the same device type, the same ranks in the same order and the same process group members;
    the first is returned. A mesh of more than one dimension (HSDP, tensor parallelism) or parameters on
    different ranks raise a TypeError naming what to do instead."""
    first, key, seen = None, None, set()
    for p in params:
        if not is_sharded(p) or id(p.device_mesh) in seen:
            continue
        mesh = p.device_mesh
        seen.add(id(mesh))
        if mesh.ndim != 1:
            raise TypeError(f"a parameter of shape {tuple(p.shape)} is sharded on a {mesh.ndim}-D device mesh of "
                            f"shape {tuple(mesh.shape)} (placements {tuple(p.placements)}: HSDP or tensor "
                            f"parallelism), which CMDOptimizer cannot serve: "
                            f"{one_mesh_advice(mesh.device_type)}")
        ranks = (mesh.device_type, _ranks(mesh), _members(mesh))
        if first is None:
            first, key = mesh, ranks
        elif ranks != key:
            raise TypeError(f"parameters are sharded on different device meshes ({key[0]} ranks {key[1]}, process "
                            f"group {key[2]}; and {ranks[0]} ranks {ranks[1]}, process group {ranks[2]}), which "
                            f"CMDOptimizer cannot serve: "
                            f"{one_mesh_advice(mesh.device_type)}")
    return first


class Sharding:
    """Where this rank's rows of each tracked parameter sit in the global (flattened, concatenated) order.

    The parameters may sit on different DeviceMesh objects over the same ranks (``fully_shard`` on each
    block and then on the root, without a mesh); :attr:`mesh` is the first of them, and every collective
    here runs on its process group (:attr:`group`)."""

    def __init__(self, params) -> None:
        from torch.distributed.tensor import Shard

        self.params = list(params)
        if not all(is_sharded(p) for p in self.params):
            raise TypeError("Sharding takes DTensor parameters only")
        self.mesh = one_mesh(self.params)
        for p in self.params:
            if tuple(p.placements) != (Shard(0),):
                raise TypeError(f"a sharded parameter of shape {tuple(p.shape)} has placements {p.placements}; "
                                "CMDOptimizer supports FSDP2's Shard(0)")
        self.group = self.mesh.get_group()
        # the process group's rank, as fully_shard's own sharding takes it
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.global_offsets, self.spans, self.local_offsets = [], [], []
        offset = local = 0
        for p in self.params:
            rows = p.shape[0]
            row = p.numel() // rows if rows else 0
            chunk = -(-rows // self.world)
            start, stop = min(self.rank * chunk, rows), min(self.rank * chunk + chunk, rows)
            if p.to_local().shape[0] != stop - start:
                raise TypeError(f"a sharded parameter of shape {tuple(p.shape)} holds {p.to_local().shape[0]} rows on "
                                f"rank {self.rank}, not the {stop - start} torch.chunk gives: unsupported sharding")
            self.global_offsets.append(offset)
            self.spans.append((start * row, stop * row))  # within the parameter, flattened
            self.local_offsets.append(local)
            offset += p.numel()
            local += (stop - start) * row
        self.global_sizes = [p.numel() for p in self.params]
        self.num_global = offset

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def local(t: torch.Tensor | None) -> torch.Tensor | None:
        """A DTensor's local shard (a view: writing it writes the parameter); other tensors as they are."""
        return t.to_local() if t is not None and is_sharded(t) else t

    def all_reduce(self, tensors) -> None:
        """Add each of ``tensors`` over the ranks, in place: one collective for all of them (float32 or float64,
        packed by dtype)."""
        tensors = [t for t in tensors if t.numel()]
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            same = [t for t in tensors if t.dtype == dtype]
            if len(same) == 1:
                dist.all_reduce(same[0], group=self.group)
                continue
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def rows(self, index: int) -> tuple[int, int]:
        """The rows ``start, stop`` of tracked parameter ``index`` that this rank holds."""
        start, stop = self.spans[index]
        row = self.params[index].numel() // max(self.params[index].shape[0], 1)
        return (start // row, stop // row) if row else (0, 0)

    def gather(self, local: torch.Tensor, index: int) -> torch.Tensor:
        """The whole of a tensor of which ``local`` is this rank's rows (shaped like tracked parameter
        ``index``'s shard): an all-gather."""
        return self.global_view(local.contiguous(), index).full_tensor()

    def agree(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every rank."""
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item() > 0)

    def owned(self, global_index: torch.Tensor) -> torch.Tensor:
        """This rank's local flat position of each global column index, -1 where another rank holds it."""
        index = global_index.cpu()
        bounds = torch.tensor(self.global_offsets[1:] + [self.num_global])
        which = torch.searchsorted(bounds, index, right=True)
        out = torch.full_like(index, -1)
        for k in which.unique().tolist():
            mask = which == k
            within = index[mask] - self.global_offsets[k]
            start, stop = self.spans[k]
            mine = (within >= start) & (within < stop)
            out[mask] = torch.where(mine, within - start + self.local_offsets[k], -1)
        return out

    # ------------------------------------------------------------------ the switch
    def fit_slopes(self, trajectory, modes: int, samples: int, seed: int, measure: bool) -> SlopeFit:
        """The decomposition of the global trajectory, each rank fitting its own columns (see the module)."""
        modes, samples = check_int("modes", modes, low=1), check_int("samples", samples, low=1)
        sampled = sample_columns(self.num_global, samples, self.global_sizes, torch.Generator().manual_seed(seed))
        positions = self.owned(sampled)
        mine = positions >= 0
        num_snapshots = trajectory.shape[0]
        gathered = torch.zeros(num_snapshots, len(sampled), dtype=torch.float64)
        if bool(mine.any()):
            gathered[:, mine] = trajectory[:, positions[mine]].double()
        self.all_reduce([gathered])
        compute = torch.float64 if trajectory.dtype == torch.float64 else torch.float32
        gathered = gathered.to(compute)
        chosen = choose_references(gathered, modes, resolution=torch.finfo(trajectory.dtype).eps)
        references = sampled[chosen]
        fit, sums = fit_slopes_to_profiles(trajectory, gathered[:, chosen].T.contiguous(),
                                           own_references=self.owned(references), measure=measure)
        if sums is not None:
            self.all_reduce(sums.tensors())
            fit.fit_quality = sums.quality()
        fit.references = references
        return fit

    # ------------------------------------------------------------------ checkpoints
    def global_view(self, local: torch.Tensor, index: int, dim: int = 0) -> torch.Tensor:
        """``local`` (shaped like parameter ``index``'s shard along ``dim``) as a DTensor sharded like it, for
        torch.distributed.checkpoint."""
        from torch.distributed.tensor import DTensor, Shard

        shape = list(local.shape)
        shape[dim] = self.params[index].shape[0]
        stride = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=tuple(stride))

    # ------------------------------------------------------------------ embedded CMD
    def decompose(self, trajectory, modes: int, samples: int, seed: int) -> tuple[Decomposition, torch.Tensor]:
        """The full decomposition (running statistics included) of this rank's columns, and the references'
        global indices (M,): :meth:`fit_slopes`'s shared profiles and quality, then a second pass fitting the
        columns against them that keeps the statistics. The Decomposition's ``references`` are this rank's
        columns of the references (-1 where another rank holds one)."""
        fit = self.fit_slopes(trajectory, modes, samples, seed, measure=True)
        d, _ = decompose_to_profiles(trajectory, fit.profiles, self.owned(fit.references))
        d.fit_quality = fit.fit_quality
        return d, fit.references

    def total(self, count: int) -> int:
        """``count`` added over the ranks."""
        value = torch.tensor([count], dtype=torch.long)
        dist.all_reduce(value, group=self.group)
        return int(value.item())

    def smallest(self, values: torch.Tensor, count: int, sizes) -> torch.Tensor:
        """Which of this rank's ``values`` (non-negative floats; NaN counts as largest) are among the ``count``
        smallest of all ranks' values, ties going to the lower global index: what a stable sort of the whole
        vector takes first. ``values`` lists this rank's values of each tracked parameter in turn (``sizes``
        of them). Radix selection on the values' bits, a byte at a time: one all-reduce of 256 counts per byte,
        then one of the ties at the threshold per parameter and rank. Returns a bool mask like ``values``."""
        keys = values.view(torch.int32 if values.element_size() == 4 else torch.int64)  # ordered as the values
        matching = torch.ones_like(values, dtype=torch.bool)
        remaining, threshold = count, 0
        for shift in range(8 * values.element_size() - 8, -1, -8):
            digit = (keys >> shift) & 255
            counts = torch.bincount(digit[matching], minlength=256)
            self.all_reduce([counts])
            below = counts.cumsum(0)
            byte = int(torch.searchsorted(below, remaining))
            remaining -= int(below[byte - 1]) if byte else 0
            threshold |= byte << shift
            matching &= digit == byte
        ties = torch.zeros(self.world, len(sizes), dtype=torch.long)  # ties at the threshold, per rank and parameter
        blocks = list(matching.split(list(sizes)))
        ties[self.rank] = torch.tensor([int(block.sum()) for block in blocks], dtype=torch.long)
        self.all_reduce([ties])
        in_order = ties.T.reshape(-1)  # the global order: parameter by parameter, each one's rows rank by rank
        ahead = (in_order.cumsum(0) - in_order).view(len(sizes), self.world)[:, self.rank]
        for block, before in zip(blocks, ahead.tolist()):
            block &= block.cumsum(0) <= remaining - before
        return (keys < threshold) | matching

    def global_vectors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (this rank's elements of the tracked parameters, in order) as one DTensor per parameter,
        shaped and sharded like it, for torch.distributed.checkpoint."""
        sizes = [stop - start for start, stop in self.spans]
        return [self.global_view(piece.reshape(p.to_local().shape), index)
                for index, (piece, p) in enumerate(zip(flat.split(sizes), self.params))]

    def local_vector(self, pieces) -> torch.Tensor:
        """The inverse of :meth:`global_vectors`: this rank's elements of each piece, concatenated."""
        return torch.cat([self.local(piece).reshape(-1) for piece in pieces])
