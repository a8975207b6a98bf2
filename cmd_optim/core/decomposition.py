"""Correlation Mode Decomposition of a parameter trajectory: ``decompose`` and ``Decomposition``.

A trajectory is a (T, N) tensor, one row per snapshot of the N trainable scalars. CMD models each
column as an affine image of one of a few reference columns::

    w_i(t) ~= a_i * profiles[assignment[i], t] + b_i

All work happens on the trajectory's device, over N in chunks, so that the extra memory stays a
small multiple of one chunk. Half-precision input is accumulated in float32; float64 stays float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_int
from .clustering import abs_correlation, cluster_references
from .sampling import sample_columns

__all__ = ["CHUNK_ELEMENTS", "ColumnSource", "Decomposition", "FitQuality", "FitSums", "SlopeFit", "choose_references",
           "chunks", "decompose", "decompose_to_profiles", "fit_slopes", "fit_slopes_to_profiles"]

#: Elements of the trajectory processed at once (columns per chunk = this // T), unless the trajectory
#: is a :class:`ColumnSource` that sets its own ``chunk_elements``.
CHUNK_ELEMENTS = 1 << 19

_STATE_TENSORS = ("assignment", "references", "profiles", "mean", "comoment", "profile_mean", "profile_m2")


class _Sizes:
    """``num_modes``, ``num_params`` and ``num_snapshots`` of a fit with ``references``, ``assignment`` and
    ``profiles`` (M, T)."""

    @property
    def num_modes(self) -> int:
        return self.references.numel()

    @property
    def num_params(self) -> int:
        return self.assignment.numel()

    @property
    def num_snapshots(self) -> int:
        return self.profiles.shape[1]


class Decomposition(_Sizes):
    """A fitted CMD model of N parameter trajectories with M modes over T snapshots.

    Attributes:
        assignment: LongTensor (N,), the mode of each parameter, in ``[0, num_modes)``.
        references: LongTensor (M,), the column index of each mode's reference parameter; -1 for one that is
            not among these columns (a Decomposition of one shard's columns, :func:`decompose_to_profiles`).
        profiles: Tensor (M, T), each reference's value at every snapshot seen so far.
        a, b: Tensor (N,), affine coefficients: ``w_i(t) ~= a_i * profiles[assignment[i], t] + b_i``.

    The least-squares fit is kept as running statistics (per parameter: mean and co-moment with its
    reference; per mode: mean and second moment of the profile), so that :meth:`update` refits
    ``a, b`` over every snapshot seen so far in O(N) memory, never storing the trajectory.
    ``fit_quality`` holds the fit's error on the decomposed trajectory when :func:`decompose` was
    asked to ``measure`` it (in the same pass as the fit).
    """

    def __init__(
        self,
        assignment: torch.Tensor,
        references: torch.Tensor,
        profiles: torch.Tensor,
        mean: torch.Tensor,
        comoment: torch.Tensor,
        profile_mean: torch.Tensor,
        profile_m2: torch.Tensor,
    ) -> None:
        self.assignment = assignment
        self.references = references
        self.profiles = profiles
        self._mean = mean
        self._comoment = comoment
        self._profile_mean = profile_mean
        self._profile_m2 = profile_m2
        self.fit_quality: FitQuality | None = None
        self._refit()

    @property
    def mode_sizes(self) -> torch.Tensor:
        """LongTensor (M,): how many parameters each mode holds."""
        return torch.bincount(self.assignment, minlength=self.num_modes)

    def _refit(self) -> None:
        self.a = _slopes(self._comoment, self._profile_m2[self.assignment])
        self.b = self._mean - self.a * self._profile_mean[self.assignment]

    def slope_fit(self) -> SlopeFit:
        """A copy of what the mode map needs: the assignment in one byte (two above 256 modes) and the slopes."""
        index_dtype = torch.uint8 if self.num_modes <= 256 else torch.int16
        return SlopeFit(self.assignment.to(index_dtype), self.a.float().clone(), self.references, self.profiles,
                        self.fit_quality)

    def evaluate(self, profile_values: torch.Tensor) -> torch.Tensor:
        """Parameters (N,) given the references' values (M,): ``a * values[assignment] + b``."""
        return torch.addcmul(self.b, self.a, profile_values.to(self.a)[self.assignment])

    def reconstruct(self) -> torch.Tensor:
        """The modelled trajectory (T, N) at every snapshot seen so far."""
        return torch.addcmul(self.b, self.a, self.profiles.T[:, self.assignment])

    def update(self, snapshot: torch.Tensor, reference_values: torch.Tensor | None = None) -> None:
        """Online CMD: add one snapshot (N,) and refit ``a, b`` as a batch fit over all snapshots would.

        ``reference_values`` (M,): the references' values at this snapshot; None reads them from ``snapshot``
        (required when a reference is not among the columns). The references and the assignment stay fixed;
        ``profiles`` gains a column; ``fit_quality`` (which described the decomposed trajectory) is cleared.
        """
        snapshot = torch.as_tensor(snapshot, device=self.a.device)
        if snapshot.shape != (self.num_params,):
            raise ValueError(f"snapshot must have shape ({self.num_params},), got {tuple(snapshot.shape)}")
        x = snapshot.to(self.a.dtype)
        bad = torch.nonzero(~torch.isfinite(x))
        if bad.numel():
            raise ValueError(f"snapshot has a non-finite value at parameter {int(bad[0])}")
        if reference_values is None:
            if bool((self.references < 0).any()):
                raise ValueError("reference_values is required: some references are not among these columns")
            r = x[self.references]
        else:
            r = torch.as_tensor(reference_values, device=self.a.device).to(self.a.dtype)
            if r.shape != (self.num_modes,) or not bool(torch.isfinite(r).all()):
                raise ValueError(f"reference_values must be {self.num_modes} finite values, got shape "
                                 f"{tuple(r.shape)}")
        count = self.num_snapshots + 1
        # Welford updates of the means and (co-)moments, exact for any number of snapshots.
        r_delta = r - self._profile_mean
        self._profile_mean += r_delta / count
        r_delta_new = r - self._profile_mean
        self._profile_m2 += r_delta * r_delta_new
        x_delta = x - self._mean
        self._mean += x_delta / count
        self._comoment.addcmul_(x_delta, r_delta_new[self.assignment])
        self.profiles = torch.cat([self.profiles, r[:, None]], dim=1)
        self.fit_quality = None
        self._refit()

    def keep_columns(self, columns: torch.Tensor) -> None:
        """Keep only the parameters ``columns`` (increasing indices, every reference among them), in place:
        their statistics, renumbered ``0 .. len(columns) - 1``; the modes' statistics are unchanged, so
        :meth:`update` goes on refitting the kept parameters exactly as before (given their values only).
        The embedded CMD reduction drops the parameters it has embedded this way. A reference that is not
        among the columns (-1) stays -1."""
        columns = torch.as_tensor(columns, device=self.assignment.device).long()
        if columns.ndim != 1 or (columns.numel() > 1 and not bool((columns.diff() > 0).all())):
            raise ValueError("columns must be a 1-D tensor of increasing parameter indices")
        if columns.numel() and (int(columns[0]) < 0 or int(columns[-1]) >= self.num_params):
            raise ValueError(f"columns must lie in [0, {self.num_params})")
        here = self.references >= 0
        position = torch.searchsorted(columns, self.references)
        if bool((here & (position >= columns.numel())).any()) or not torch.equal(columns[position.clamp(
                max=max(columns.numel() - 1, 0))][here], self.references[here]):
            raise ValueError("columns must keep every mode's reference")
        self.assignment = self.assignment[columns]
        self.references = torch.where(here, position, -1)
        self._mean = self._mean[columns]
        self._comoment = self._comoment[columns]
        self.fit_quality = None
        self._refit()

    def relative_error(self, trajectory: torch.Tensor) -> torch.Tensor:
        """Per-snapshot relative reconstruction error (T,): ``||w(t) - w_hat(t)|| / ||w(t)||``."""
        return FitQuality.from_sums(*self._residuals(trajectory)).relative_error

    def explained_variance(self, trajectory: torch.Tensor) -> float:
        """Fraction of the trajectory's variance about each parameter's temporal mean that the model explains."""
        return FitQuality.from_sums(*self._residuals(trajectory)).explained_variance

    def _residuals(self, trajectory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Squared residual norm (T,), squared snapshot norm (T,), total centered sum of squares."""
        trajectory = _as_trajectory(trajectory)
        if trajectory.shape != (self.num_snapshots, self.num_params):
            raise ValueError(
                f"trajectory must have shape ({self.num_snapshots}, {self.num_params}), got {tuple(trajectory.shape)}"
            )
        dtype = self.a.dtype
        residual = torch.zeros(self.num_snapshots, dtype=dtype, device=self.a.device)
        norm = torch.zeros_like(residual)
        total = torch.zeros((), dtype=dtype, device=self.a.device)
        for cols in chunks(trajectory):
            x = trajectory[:, cols].to(dtype)
            model = torch.addcmul(self.b[cols], self.a[cols], self.profiles.T[:, self.assignment[cols]])
            _accumulate_residuals(x, model, residual, norm, total)
        return residual, norm, total

    def state_dict(self) -> dict[str, Any]:
        """Tensors only, readable by ``torch.load(..., weights_only=True)``."""
        return {
            "assignment": self.assignment,
            "references": self.references,
            "profiles": self.profiles,
            "mean": self._mean,
            "comoment": self._comoment,
            "profile_mean": self._profile_mean,
            "profile_m2": self._profile_m2,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Decomposition:
        """The Decomposition ``state`` describes (copied); every entry is checked first."""
        missing = [key for key in _STATE_TENSORS if key not in state]
        if missing:
            raise KeyError(f"Decomposition state_dict is missing {', '.join(missing)}")
        if not all(isinstance(state[key], torch.Tensor) for key in _STATE_TENSORS):
            raise TypeError("Decomposition state_dict entries must be tensors")
        n, m = state["assignment"].numel(), state["references"].numel()
        expected = {"assignment": (n,), "references": (m,), "mean": (n,), "comoment": (n,), "profile_mean": (m,),
                    "profile_m2": (m,)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"Decomposition state_dict entry {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {shape}")
        if state["profiles"].ndim != 2 or state["profiles"].shape[0] != m:
            raise ValueError(f"Decomposition state_dict entry 'profiles' has shape {tuple(state['profiles'].shape)}, "
                             f"expected ({m}, snapshots)")
        for key, low, limit in (("assignment", 0, m), ("references", -1, n)):
            values = state[key]
            if values.dtype != torch.long or (values.numel() and (int(values.min()) < low or
                                                                  int(values.max()) >= limit)):
                raise ValueError(f"Decomposition state_dict entry {key!r} must hold integers in [{low}, {limit})")
        return cls(**{key: state[key].clone() for key in _STATE_TENSORS})

    def __repr__(self) -> str:
        return (
            f"Decomposition(num_params={self.num_params}, num_modes={self.num_modes}, "
            f"num_snapshots={self.num_snapshots}, dtype={self.a.dtype}, device={self.a.device})"
        )


@dataclass
class FitQuality:
    """How well a decomposition reproduces a trajectory (T, N).

    ``relative_error`` (T,): ``||w(t) - w_hat(t)|| / ||w(t)||`` per snapshot; ``explained_variance``: the
    share of the variance about each parameter's temporal mean that the model explains.
    """

    relative_error: torch.Tensor
    explained_variance: float

    @classmethod
    def from_sums(cls, residual: torch.Tensor, norm: torch.Tensor, total: torch.Tensor) -> FitQuality:
        """From per-snapshot squared residual and snapshot norms (T,) and the total centred sum of squares."""
        error = (residual / norm.clamp_min(torch.finfo(norm.dtype).tiny)).sqrt()
        explained = 1.0 - float(residual.sum() / total) if total > 0 else 1.0
        return cls(error, explained)


class ColumnSource:
    """Base class of trajectories read on demand rather than held in memory.

    A subclass sets ``shape`` ((T, N) ``torch.Size``), ``dtype`` and ``device``, and answers
    ``source[:, columns]`` (``columns`` a slice or a LongTensor of column indices) with a (T, len) tensor.
    :func:`decompose`, :meth:`Decomposition.relative_error` and :meth:`Decomposition.explained_variance`
    accept one and read it in chunks of ``chunk_elements`` values (see
    :class:`cmd_optim.analysis.CheckpointTrajectory`).
    """

    shape: torch.Size
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    chunk_elements: int = CHUNK_ELEMENTS

    def __getitem__(self, key) -> torch.Tensor:
        raise NotImplementedError


def chunks(trajectory) -> list[slice]:
    """Column slices covering a (T, N) trajectory, each of about ``CHUNK_ELEMENTS`` values (or the
    source's own ``chunk_elements``)."""
    num_snapshots, num_params = trajectory.shape
    width = max(1, getattr(trajectory, "chunk_elements", CHUNK_ELEMENTS) // num_snapshots)
    return [slice(start, min(start + width, num_params)) for start in range(0, num_params, width)]


def decompose(
    trajectory: torch.Tensor | ColumnSource,
    modes: int = 10,
    samples: int = 1000,
    seed: int = 0,
    layer_sizes: Sequence[int] | None = None,
    measure: bool = False,
) -> Decomposition:
    """Fit CMD to a trajectory (T, N): one row per snapshot, one column per parameter.

    Args:
        trajectory: floating tensor (T, N) with T >= 3, on any device, or a :class:`ColumnSource` that
            reads it on demand (the trajectory is then never held whole: memory is a chunk of columns).
        modes: the most modes to find (the clustering may find fewer).
        samples: how many columns the clustering sees (K); at least ``modes``.
        seed: seeds the column sampling; equal inputs and seeds give equal results.
        layer_sizes: sizes of consecutive column blocks (layers), summing to N. When given, half of the
            samples are spread evenly over the layers and half in proportion to their sizes.
        measure: also measure the fit on ``trajectory`` (``fit_quality``) in the same pass: the explained
            variance exactly, the relative error per snapshot on about 8 evenly spread chunks of columns.

    Memory: the results, 24 bytes per parameter (:func:`fit_slopes` needs 5), plus a chunk of columns.
    """
    trajectory = _as_trajectory(trajectory)
    refs = _choose_references(trajectory, modes, samples, seed, layer_sizes)
    d, sums = _decompose_against(trajectory, refs, refs.references, measure)
    d.fit_quality = sums.quality() if sums is not None else None
    return d


def decompose_to_profiles(trajectory, profiles: torch.Tensor, own_references: torch.Tensor,
                          measure: bool = False) -> tuple[Decomposition, FitSums | None]:
    """:func:`decompose`'s fit of every column of ``trajectory`` (T, N) against given reference profiles (M, T),
    as :func:`fit_slopes_to_profiles` does, keeping the running statistics (a :class:`Decomposition` that
    :meth:`Decomposition.update` refits online). ``own_references`` (M,) gives the column of each reference in
    this trajectory, -1 where it lies elsewhere (one shard of a sharded trajectory): the Decomposition's
    ``references``. Returns it and, with ``measure``, the raw sums of its quality (they add over shards)."""
    trajectory = _as_trajectory(trajectory, minimum_columns=0)
    refs = _profile_statistics(torch.as_tensor(profiles), trajectory.dtype)
    return _decompose_against(trajectory, refs, torch.as_tensor(own_references, dtype=torch.long), measure)


def _decompose_against(trajectory, refs: _References, own_references: torch.Tensor,
                       measure: bool) -> tuple[Decomposition, FitSums | None]:
    """Steps 5-6 with the running statistics; each reference column (``own_references`` >= 0) follows its own
    profile exactly (a = 1, b = 0), even if an identical column exists."""
    num_params, device, dtype = trajectory.shape[1], trajectory.device, refs.profiles.dtype
    assignment = torch.empty(num_params, dtype=torch.long, device=device)
    mean = torch.empty(num_params, dtype=dtype, device=device)
    comoment = torch.empty(num_params, dtype=dtype, device=device)

    def store(cols, mode, chunk_comoment, chunk_mean):
        assignment[cols], comoment[cols], mean[cols] = mode, chunk_comoment, chunk_mean

    sums = _fit_columns(trajectory, refs, measure, store)
    if not torch.isfinite(comoment).all():
        _raise_too_large(dtype)
    own_references = own_references.to(device)
    here = own_references >= 0
    columns = own_references[here]
    assignment[columns] = here.nonzero().squeeze(1)
    comoment[columns] = refs.m2[here]
    mean[columns] = refs.mean[here]
    return Decomposition(assignment, own_references, refs.profiles, mean, comoment, refs.mean, refs.m2), sums


@dataclass
class SlopeFit(_Sizes):
    """What the mode map needs of a decomposition, and nothing else: 5 bytes per parameter.

    ``assignment`` (N,) uint8 (int16 above 256 modes), ``a`` (N,) float32 the least-squares slopes,
    ``references`` (M,) and ``profiles`` (M, T) as in :class:`Decomposition`, ``fit_quality`` if measured.
    No offsets and no running statistics: it cannot be updated online.
    """

    assignment: torch.Tensor
    a: torch.Tensor
    references: torch.Tensor
    profiles: torch.Tensor
    fit_quality: FitQuality | None = None


def fit_slopes(
    trajectory: torch.Tensor | ColumnSource,
    modes: int = 10,
    samples: int = 1000,
    seed: int = 0,
    layer_sizes: Sequence[int] | None = None,
    measure: bool = False,
) -> SlopeFit:
    """:func:`decompose`, keeping only the assignment (1 byte per parameter) and the slopes (4): the same
    references, assignment and slopes, in a fifth of the memory."""
    trajectory = _as_trajectory(trajectory)
    refs = _choose_references(trajectory, modes, samples, seed, layer_sizes)
    fit, sums = fit_slopes_to_profiles(trajectory, refs.profiles, own_references=refs.references, measure=measure)
    fit.references, fit.fit_quality = refs.references, sums.quality() if sums is not None else None
    return fit


def fit_slopes_to_profiles(trajectory, profiles: torch.Tensor, own_references: torch.Tensor | None = None,
                           measure: bool = False) -> tuple[SlopeFit, FitSums | None]:
    """Steps 5-6 of CMD against given reference profiles (M, T): every column of ``trajectory`` (T, N) gets
    the mode whose profile it correlates with most and its least-squares slope. ``own_references`` (M,)
    gives the column of each reference in this trajectory (-1 where it lies elsewhere, as in one shard of
    a sharded trajectory); those columns get their own mode and slope 1. Returns the fit (its
    ``references`` are ``own_references``) and, with ``measure``, the raw sums of its quality (sums over
    shards add up: :meth:`FitSums.quality` of the added sums is the quality of the whole)."""
    trajectory = _as_trajectory(trajectory, minimum_columns=0)
    refs = _profile_statistics(torch.as_tensor(profiles), trajectory.dtype)
    num_params, device = trajectory.shape[1], trajectory.device
    index_dtype = torch.uint8 if refs.profiles.shape[0] <= 256 else torch.int16
    assignment = torch.empty(num_params, dtype=index_dtype, device=device)
    a = torch.empty(num_params, dtype=torch.float32, device=device)

    def store(cols, mode, chunk_comoment, chunk_mean):
        assignment[cols] = mode.to(index_dtype)
        a[cols] = _slopes(chunk_comoment, refs.m2[mode]).float()

    sums = _fit_columns(trajectory, refs, measure, store) if num_params else (
        FitSums(trajectory.shape[0], refs.profiles.dtype, device) if measure else None)
    if not torch.isfinite(a).all():
        _raise_too_large(refs.profiles.dtype)
    references = torch.full((refs.profiles.shape[0],), -1, dtype=torch.long) if own_references is None else \
        torch.as_tensor(own_references, dtype=torch.long)
    for mode, column in enumerate(references.tolist()):  # a reference follows its own profile exactly
        if column >= 0:
            assignment[column] = mode
            a[column] = 1.0 if bool(refs.m2[mode] > 0) else 0.0
    return SlopeFit(assignment, a, references.to(device), refs.profiles), sums


@dataclass
class _References:
    """The chosen references and the statistics of their profiles that the per-column fit needs."""

    references: torch.Tensor | None  # (M,) column indices
    profiles: torch.Tensor  # (M, T)
    mean: torch.Tensor  # (M,)
    m2: torch.Tensor  # (M,) sum of squared deviations
    std: torch.Tensor  # (M,) sqrt(m2)
    weights: torch.Tensor  # (M + 1, T): centred profiles over their std, and a row of ones


def _choose_references(trajectory, modes, samples, seed, layer_sizes) -> _References:
    """Steps 1-4 of CMD: sample columns, |corr| among them, cluster, pick each cluster's reference."""
    modes = check_int("modes", modes, low=1)
    samples = check_int("samples", samples, low=1)
    if samples < modes:
        raise ValueError(f"samples must be >= modes ({modes}), got {samples}")
    seed = check_int("seed", seed, low=0, high=2**63 - 1)
    num_params = trajectory.shape[1]
    device, dtype = trajectory.device, _compute_dtype(trajectory.dtype)
    generator = torch.Generator().manual_seed(seed)
    sampled = sample_columns(num_params, samples, layer_sizes, generator).to(device)
    sampled_columns = trajectory[:, sampled].to(dtype)
    if not torch.isfinite(sampled_columns).all():
        _raise_non_finite(trajectory, slice(0, num_params))
    chosen = choose_references(sampled_columns, modes, resolution=torch.finfo(trajectory.dtype).eps)
    refs = _profile_statistics(sampled_columns[:, chosen].T.contiguous(), trajectory.dtype)
    refs.references = sampled[chosen.to(device)]
    return refs


def choose_references(sampled_columns: torch.Tensor, modes: int, resolution: float | None = None) -> torch.Tensor:
    """Steps 2-4 of CMD on sampled columns (T, K): |corr| among them, complete-linkage clustering into at
    most ``modes`` clusters, each cluster's reference; returns their positions among the K (a LongTensor)."""
    corr, constant = abs_correlation(sampled_columns, resolution=resolution)
    return cluster_references(corr, constant, modes)


def _profile_statistics(profiles: torch.Tensor, storage_dtype: torch.dtype) -> _References:
    """What the per-column fit needs of the reference profiles (M, T), in the compute dtype."""
    dtype = _compute_dtype(storage_dtype)
    profiles = profiles.to(dtype)
    # The profiles' statistics in float64 (M x T numbers): a float32 mean leaves centred rows that do not
    # sum to zero, and for a reference that barely moves that rounding would dominate its co-moments.
    exact = profiles.double()
    exact_mean = exact.mean(dim=1)
    centered = exact - exact_mean[:, None]
    exact_m2 = centered.square().sum(dim=1)
    exact_std = exact_m2.sqrt()
    # One product per chunk gives every column's co-moment with every profile, divided by the profile's
    # std (for a fixed column, |corr| is proportional to that), and, in the last row, the column sums.
    weights = torch.cat([centered / torch.where(exact_std > 0, exact_std, 1)[:, None],
                         torch.ones_like(centered[:1])]).to(dtype)
    refs = _References(None, profiles, exact_mean.to(dtype), exact_m2.to(dtype), exact_std.to(dtype), weights)
    if not (torch.isfinite(refs.m2).all() and torch.isfinite(weights).all()):
        _raise_too_large(dtype)
    return refs


def _fit_columns(trajectory, refs: _References, measure: bool, store) -> FitSums | None:
    """Steps 5-6, one pass over the trajectory: every column's mode (highest |corr| with a profile), its
    co-moment with that profile and its mean, handed to ``store(cols, mode, comoment, mean)`` a chunk at a
    time; with ``measure``, the fit's quality gathered in the same pass."""
    num_snapshots = trajectory.shape[0]
    dtype = refs.profiles.dtype
    sums = FitSums(num_snapshots, dtype, trajectory.device) if measure else None
    pieces = chunks(trajectory)
    measured = set(range(0, len(pieces), max(1, len(pieces) // 8)))
    for index, cols in enumerate(pieces):
        x = trajectory[:, cols].to(dtype)
        first = x[0]
        shifted = x - first  # constant columns give exact zeros; rounding in the weights multiplies movement only
        stats = refs.weights @ shifted  # (M + 1, chunk)
        if not torch.isfinite(stats).all():
            _raise_non_finite(trajectory, cols)
        mode = stats[:-1].abs().max(dim=0).indices
        comoment = stats[:-1].gather(0, mode[None]).squeeze(0) * refs.std[mode]
        mean = first + stats[-1] / num_snapshots
        store(cols, mode, comoment, mean)
        if sums is not None:
            sums.add_columns(shifted, stats[-1], comoment, refs.m2[mode])
            if index in measured:
                a = _slopes(comoment, refs.m2[mode])
                sums.add_snapshots(x, torch.addcmul(mean - a * refs.mean[mode], a, refs.profiles.T[:, mode]))
    return sums


def _slopes(comoment: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Least-squares slopes ``comoment / m2``, 0 where the reference does not move."""
    return torch.where(m2 > 0, comoment / torch.where(m2 > 0, m2, 1), 0)


def _accumulate_residuals(x, model, residual, norm, total=None) -> None:
    """Add a chunk's squared residuals and norms per snapshot (T,) and (into ``total``, if given) its
    centred sum of squares."""
    residual += (x - model).square().sum(dim=1)
    norm += x.square().sum(dim=1)
    if total is not None:
        total += (x - x.mean(dim=0)).square().sum()


class FitSums:
    """The fit's quality, gathered during :func:`decompose`'s one pass. Sums over the shards of a trajectory
    add up: all-reduce :meth:`tensors` in place, then :meth:`quality` is the whole's.

    Explained variance exactly, from each column's least-squares residual ``S_xx - comoment^2 / m2`` (one
    sum of squares per column); the relative error per snapshot from the exact residuals of every k-th
    chunk (about 8 chunks: a sample of whole chunks, so the pass stays one read of the trajectory).
    """

    def __init__(self, num_snapshots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_snapshots = num_snapshots
        self.residual = torch.zeros(num_snapshots, dtype=dtype, device=device)
        self.norm = torch.zeros_like(self.residual)
        self.column_residual = torch.zeros((), dtype=torch.float64, device=device)
        self.column_total = torch.zeros((), dtype=torch.float64, device=device)

    def add_columns(self, shifted, shifted_sums, comoment, m2) -> None:
        spread = (shifted.square().sum(dim=0) - shifted_sums.square() / self.num_snapshots).clamp_min(0)
        explained = torch.where(m2 > 0, comoment.square() / torch.where(m2 > 0, m2, 1), 0)
        self.column_residual += (spread - explained).clamp_min(0).double().sum()
        self.column_total += spread.double().sum()

    def add_snapshots(self, x, model) -> None:
        _accumulate_residuals(x, model, self.residual, self.norm)

    def tensors(self) -> list[torch.Tensor]:
        """The sums themselves (to all-reduce across the shards of a trajectory, in place)."""
        return [self.residual, self.norm, self.column_residual, self.column_total]

    def quality(self) -> FitQuality:
        error = (self.residual / self.norm.clamp_min(torch.finfo(self.norm.dtype).tiny)).sqrt()
        total = float(self.column_total)
        return FitQuality(error, 1.0 - float(self.column_residual) / total if total > 0 else 1.0)


def _as_trajectory(trajectory, minimum_columns: int = 1) -> torch.Tensor | ColumnSource:
    if not isinstance(trajectory, ColumnSource):
        trajectory = torch.as_tensor(trajectory)
    shape = tuple(trajectory.shape)
    if len(shape) != 2:
        raise ValueError(f"trajectory must be 2-D (snapshots, parameters), got shape {shape}")
    if not trajectory.dtype.is_floating_point:
        raise ValueError(f"trajectory must be a floating-point tensor, got {trajectory.dtype}")
    if shape[0] < 3:
        raise ValueError(f"trajectory needs at least 3 snapshots (rows), got {shape[0]}")
    if shape[1] < minimum_columns:
        raise ValueError("trajectory has no parameters (0 columns)")
    if shape[0] > 4096 and shape[0] > shape[1]:
        warnings.warn(f"trajectory has {shape[0]} snapshots (rows) of {shape[1]} parameters (columns): rows are "
                      "snapshots; pass trajectory.T if it is the other way round", stacklevel=3)
    return trajectory


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raise_too_large(dtype: torch.dtype) -> None:
    raise ValueError(f"trajectory values are too large for {dtype} statistics (their squared deviations "
                     "overflow); pass the trajectory as float64")


def _raise_non_finite(trajectory: torch.Tensor, cols: slice) -> None:
    """Raise a ValueError naming the first column in ``cols`` that holds a non-finite value."""
    block_source = trajectory[:, cols]
    for chunk in chunks(block_source):
        block = block_source[:, chunk]
        bad_columns = (~torch.isfinite(block).all(dim=0)).nonzero()
        if bad_columns.numel():
            col = int(bad_columns[0])
            row = int((~torch.isfinite(block[:, col])).nonzero()[0])
            raise ValueError(
                f"trajectory has a non-finite value in column {cols.start + chunk.start + col} (snapshot {row}); "
                "it is the first bad column"
            )
    _raise_too_large(_compute_dtype(trajectory.dtype))
