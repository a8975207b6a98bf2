"""One-sided subspaces of weight matrices: the math of the low-rank reduction, apart from any optimizer.

For a matrix W of shape (m, n) the basis ``P`` holds r orthonormal directions of its shorter side
d = min(m, n) (the *projected side*; the longer one, D = max(m, n), is kept whole):

- ``left``  (m <= n): P is (m, r); a gradient G projects to ``P^T G`` (r, n) and a low-rank step L lifts to ``P L``.
- ``right`` (m > n):  P is (n, r); G projects to ``G P`` (m, r) and L lifts to ``L P^T``.

A step of the reduced phase moves W by the lifted step of the core, plus (optionally) the *residual* part of
the gradient that the subspace misses, ``G - lift(project(G))``, scaled per line of the long side by how much
the base optimizer scaled that line's projected gradient (the base's step length over the gradient's, so a
plain SGD step is reproduced exactly). ``refresh`` replaces bases with the top-r singular directions of
source matrices and returns the rotations ``P_new^T P_old`` (r, r) that carry optimizer state across.

Each operation has a ``*_reference`` formula; :func:`apply_step` dispatches to the fused path (one GEMM
into W instead of two and no (m, n) temporary for the residual) or the reference, and the tests hold the
fused path to the reference. On a tall right-side matrix (:data:`TALL`: a vocabulary table, most of whose rows
get no gradient in a step) the fused path and :func:`project` multiply only the rows that have one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["KERNELS", "TALL", "SubspaceMap", "apply_step", "apply_step_reference", "lift_reference", "live_rows",
           "project", "project_reference", "residual_scale", "rotate_state", "top_directions"]

KERNELS = ("auto", "fused", "reference")


@dataclass
class _Basis:
    """The basis of one matrix: shape (m, n), side, and P (d, r) float32."""

    shape: tuple[int, int]
    left: bool
    basis: torch.Tensor

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def core_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (self.rank, n) if self.left else (m, self.rank)


def project_reference(basis: torch.Tensor, left: bool, grad: torch.Tensor) -> torch.Tensor:
    """``P^T G`` (left) or ``G P`` (right), float32."""
    g = grad.float()
    return basis.T @ g if left else g @ basis


def lift_reference(basis: torch.Tensor, left: bool, low: torch.Tensor) -> torch.Tensor:
    """``P L`` (left) or ``L P^T`` (right): the (m, n) matrix of a core-shaped ``low``."""
    return basis @ low if left else low @ basis.T


#: A right-side matrix at least this many times taller than wide (a vocabulary or position table, whose rows a
#: batch reaches a few of) is projected and moved on its rows with a gradient or a move only, where those are at
#: most half of its rows (the fused kernels, on the CPU only: finding the rows costs a host sync in the projection
#: and one in the move, which on an accelerator would stall the queue; the reference always takes every row).
TALL = 8


def _tall(left: bool, matrix: torch.Tensor) -> bool:
    return not left and matrix.device.type == "cpu" and matrix.shape[0] >= TALL * matrix.shape[1]


def live_rows(*tensors: torch.Tensor) -> torch.Tensor | None:
    """The indices of the rows that any of ``tensors`` (same row count) is nonzero in, if they are at most half
    of the rows; None otherwise (the dense path is then as cheap). One host sync."""
    live = tensors[0].any(1)
    for t in tensors[1:]:
        live |= t.any(1)
    index = live.nonzero().squeeze(1)
    return index if 2 * index.numel() <= live.numel() else None


def project(basis: torch.Tensor, left: bool, grad: torch.Tensor) -> torch.Tensor:
    """:func:`project_reference`; for a tall right-side matrix with rows of zero gradient (:data:`TALL`), the
    product of the other rows only (the skipped rows' projections are 0)."""
    index = live_rows(grad) if _tall(left, grad) else None
    if index is None:
        return project_reference(basis, left, grad)
    g = grad.float()
    return g.new_zeros(g.shape[0], basis.shape[1]).index_copy_(0, index, g.index_select(0, index) @ basis)


#: how far one line's residual scale may exceed the matrix's (a line whose projected gradient is nearly 0
#: while the base's step on it is not, e.g. through momentum, would otherwise get an unbounded scale)
LINE_SCALE_CAP = 2.0


def residual_scale(step: torch.Tensor, low_grad: torch.Tensor, left: bool,
                   whole: torch.Tensor | None = None) -> torch.Tensor:
    """Per line of the long side, ``||step line|| / ||gradient line||``, capped at ``LINE_SCALE_CAP`` times the
    matrix's ``||step|| / ||gradient||`` (0 where the gradient is 0): (1, n) for a left core (its columns),
    (m, 1) for a right one (its rows). ``whole``: that matrix ratio, given (a block of a right core's rows
    holds only its own part of the norms)."""
    dim = 0 if left else 1
    tiny = torch.finfo(torch.float32).tiny
    # sums of squares, not torch.linalg.vector_norm: across the rows of a (r, n) core (dim 0) the latter
    # measured 10x slower on the CPU; the matrix norms are the sums of the lines'
    step_square = step.square().sum(dim, keepdim=True)
    grad_square = low_grad.float().square().sum(dim, keepdim=True)
    step_norm, grad_norm = step_square.sqrt(), grad_square.sqrt()
    if whole is None:
        whole = step_square.sum().sqrt() / grad_square.sum().sqrt().clamp_min(tiny)
    if LINE_SCALE_CAP == 0:  # (research switch: one scale for the whole matrix)
        return torch.where(grad_norm > 0, whole, 0.0).expand_as(grad_norm)
    line = step_norm / grad_norm.clamp_min(tiny)
    return torch.where(grad_norm > 0, torch.minimum(line, LINE_SCALE_CAP * whole), 0.0)


def apply_step_reference(weight: torch.Tensor, basis: torch.Tensor, left: bool, step: torch.Tensor,
                         grad: torch.Tensor | None = None, low_grad: torch.Tensor | None = None,
                         whole: torch.Tensor | None = None, gain: float = 1.0, keep: float = 1.0) -> None:
    """``W = keep * W + gain * lift(step)``, and with ``grad``: ``- gain * scale * (G - lift(low_grad))``, ``scale``
    from :func:`residual_scale` (the part of the gradient outside the subspace, stepped as the base stepped
    inside). ``keep``: decoupled weight decay's factor, ``1 - lr * weight_decay``."""
    move = lift_reference(basis, left, step)
    if grad is not None:
        scale = residual_scale(step, low_grad, left, whole)
        move = move - scale * (grad.float() - lift_reference(basis, left, low_grad))
    if keep != 1.0:
        weight.mul_(keep)
    weight.add_(move.mul_(gain).view(weight.shape).to(weight.dtype))


def _apply_step_fused(weight: torch.Tensor, basis: torch.Tensor, left: bool, step: torch.Tensor,
                      grad: torch.Tensor | None, low_grad: torch.Tensor | None, whole: torch.Tensor | None,
                      gain: float, keep: float) -> None:
    """The same move as the reference, as ``W = keep * W + gain * lift(step + scale * low_grad)`` then
    ``W -= gain * scale * G``: one GEMM, written into W itself (the decay its ``beta``) when W is a contiguous
    float32 matrix."""
    core = step
    if grad is not None:
        scale = residual_scale(step, low_grad, left, whole)
        core = torch.addcmul(step, scale, low_grad)
    target = weight.view(weight.shape[0], -1)
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        move = lift_reference(basis, left, core)
        if grad is not None:
            move -= scale * grad.reshape(move.shape).float()
        if keep != 1.0:
            weight.mul_(keep)
        weight.add_(move.mul_(gain).view(weight.shape).to(weight.dtype))  # move is a fresh temporary
        return
    # a tall matrix's row moves only where its core step or its projected gradient is nonzero (the residual's
    # scale is 0 where the latter is): two (m, r) passes find them, not one over the (m, n) gradient
    index = None if not _tall(left, target) else live_rows(step) if grad is None else live_rows(step, low_grad)
    if index is not None:  # the rows that move; the others only decay
        if keep != 1.0:
            target.mul_(keep)
        move = core.index_select(0, index) @ basis.T
        if grad is not None:
            move.addcmul_(scale.index_select(0, index), grad.reshape(target.shape).index_select(0, index).float(),
                          value=-1.0)
        target.index_add_(0, index, move, alpha=gain)
        return
    if left:
        target.addmm_(basis, core, beta=keep, alpha=gain)
    else:
        target.addmm_(core, basis.T, beta=keep, alpha=gain)
    if grad is not None:
        target.addcmul_(scale, grad.reshape(target.shape).float(), value=-gain)


def apply_step(weight: torch.Tensor, basis: torch.Tensor, left: bool, step: torch.Tensor,
               grad: torch.Tensor | None = None, low_grad: torch.Tensor | None = None, kernel: str = "auto",
               whole: torch.Tensor | None = None, gain: float = 1.0, keep: float = 1.0) -> None:
    """Dispatch :func:`apply_step_reference` or its fused twin (``kernel``: one of :data:`KERNELS`)."""
    if kernel == "reference":
        apply_step_reference(weight, basis, left, step, grad, low_grad, whole, gain, keep)
    else:
        _apply_step_fused(weight, basis, left, step, grad, low_grad, whole, gain, keep)


def top_directions(source: torch.Tensor, rank: int, left: bool, seed: int) -> torch.Tensor | None:
    """(d, rank): the top singular directions of ``source`` (m, n) on its projected side (left: column space,
    right: row space), orthonormal, except that a direction whose singular value is rounding noise (at most
    ``max(m, n) * eps`` of the largest, as :func:`torch.linalg.matrix_rank` counts) is a zero column, so a
    core never trains along noise. None if ``source`` is zero or not finite. Exact for small matrices;
    otherwise a randomised range finder with one power iteration, O(m n rank), its Gaussian test matrix drawn
    from ``seed`` (the global RNG is not touched)."""
    a = source.float() if left else source.float().T  # (d, D): directions of the rows
    if not bool(torch.isfinite(a).all()) or not bool(a.abs().amax() > 0):
        return None
    d, wide = a.shape
    if rank * 4 >= d:
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
    else:
        k = min(rank + 8, d)
        test = torch.randn(wide, k, generator=torch.Generator().manual_seed(seed)).to(a.device)
        q = torch.linalg.qr(a @ test).Q
        q = torch.linalg.qr(a @ (a.T @ q)).Q
        u, s, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ u
    signal = s[:rank] > s[0] * wide * torch.finfo(torch.float32).eps
    return (u[:, :rank] * signal).contiguous()


def rotate_state(value: torch.Tensor, rotation: torch.Tensor, left: bool, second_moment: bool) -> torch.Tensor:
    """A core-shaped optimizer state tensor re-expressed in a new basis (``rotation = P_new^T P_old``): first
    moments move linearly, second moments through the squared rotation (exact if coordinates were independent)."""
    q = rotation * rotation if second_moment else rotation
    return q @ value if left else value @ q.T


class SubspaceMap:
    """The bases of a list of matrices (shapes (m_i, n_i), ranks r_i <= min(m_i, n_i)).

    ``bases`` are given (restored state) or start as None until :meth:`refresh` finds them; ``seed`` makes
    every refresh's random test matrix a function of (seed, refresh count, matrix index).

    Row blocks (a row-sharded matrix, e.g. FSDP2's ``Shard(0)``): :meth:`project`, :meth:`apply` and
    :meth:`carry` take ``rows=(start, stop)`` and the block's rows of the gradient and the weight. A right
    core's block is the same rows of the core; a left core is whole on every block, and :meth:`project` and
    :meth:`carry` then give this block's share of it (the sum over the blocks is the whole projection).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], ranks: Sequence[int], device: torch.device,
                 bases: Sequence[torch.Tensor] | None = None, seed: int = 0, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel, self.seed = kernel, seed
        self.entries: list[_Basis] = []
        for index, ((m, n), r) in enumerate(zip(shapes, ranks)):
            left = m <= n
            d = min(m, n)
            if not 1 <= r <= d:
                raise ValueError(f"rank {r} of matrix {index} ({m} x {n}) must be in [1, {d}]")
            basis = bases[index] if bases is not None else _identity_columns(d, r, device)
            if tuple(basis.shape) != (d, r):
                raise ValueError(f"the basis of matrix {index} must be ({d}, {r}), got {tuple(basis.shape)}")
            self.entries.append(_Basis((m, n), left, basis.to(device, torch.float32).contiguous()))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bases(self) -> list[torch.Tensor]:
        return [e.basis for e in self.entries]

    def core_shape(self, index: int) -> tuple[int, int]:
        return self.entries[index].core_shape

    def is_left(self, index: int) -> bool:
        """Whether matrix ``index`` is projected on its rows' side (m <= n; its core is (r, n))."""
        return self.entries[index].left

    def _block(self, index: int, rows: tuple[int, int] | None) -> tuple[_Basis, torch.Tensor, tuple[int, int]]:
        """The entry, the basis rows a block of rows ``rows`` meets, and the block's (rows, n) shape."""
        e = self.entries[index]
        if rows is None:
            return e, e.basis, e.shape
        start, stop = rows
        return e, e.basis[start:stop] if e.left else e.basis, (stop - start, e.shape[1])

    def project(self, index: int, grad: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        e, basis, shape = self._block(index, rows)
        grad = grad.reshape(shape)
        return project_reference(basis, e.left, grad) if self.kernel == "reference" else project(basis, e.left, grad)

    def lift(self, index: int, low: torch.Tensor) -> torch.Tensor:
        e = self.entries[index]
        return lift_reference(e.basis, e.left, low)

    def apply(self, index: int, weight: torch.Tensor, step: torch.Tensor, grad: torch.Tensor | None = None,
              low_grad: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
              whole: torch.Tensor | None = None, gain: float = 1.0, keep: float = 1.0) -> None:
        """Scale ``weight`` by ``keep`` and move it by ``gain`` times the lifted ``step`` (and the scaled residual
        of ``grad``, see the module); with ``rows``, a block of them (``whole``: the matrix's step-to-gradient
        norm ratio, see :func:`residual_scale`)."""
        e, basis, shape = self._block(index, rows)
        apply_step(weight, basis, e.left, step, None if grad is None else grad.reshape(shape), low_grad,
                   self.kernel, whole, gain, keep)

    def refresh(self, sources: dict[int, torch.Tensor], count: int,
                agree: Callable[[list[torch.Tensor]], None] | None = None) -> dict[int, torch.Tensor]:
        """New directions for each matrix ``index`` of ``sources`` (index -> (m, n) source), from the ``count``-th
        refresh's test matrices. ``agree`` may overwrite the found bases in place before they are installed
        (one call for all of them: e.g. a broadcast that keeps replicas identical). Returns the rotation
        ``P_new^T P_old`` (r, r) of every matrix whose basis changed (a source with no signal keeps its basis)."""
        found = {}
        for index, source in sources.items():
            e = self.entries[index]
            seed = (self.seed * 1_000_003 + count) * 1009 + index
            basis = top_directions(source.reshape(e.shape), e.rank, e.left, seed)
            if basis is not None:
                found[index] = basis
        if agree is not None and found:
            agree(list(found.values()))
        rotations = {}
        for index, basis in found.items():
            e = self.entries[index]
            rotations[index] = basis.T @ e.basis
            e.basis = basis
        return rotations

    def rotate(self, index: int, value: torch.Tensor, rotation: torch.Tensor, second_moment: bool) -> torch.Tensor:
        return rotate_state(value, rotation, self.entries[index].left, second_moment)

    def carry(self, index: int, value: torch.Tensor, second_moment: bool,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A full (m, n) optimizer state tensor (or a block of its ``rows``) expressed in the core: projected
        (first moments) or through the squared basis (second moments)."""
        e, basis, shape = self._block(index, rows)
        basis = basis * basis if second_moment else basis
        return project_reference(basis, e.left, value.reshape(shape))


def _identity_columns(d: int, r: int, device) -> torch.Tensor:
    return torch.eye(d, r, device=device)
