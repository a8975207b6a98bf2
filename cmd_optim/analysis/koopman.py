"""Comparing training runs through their Koopman eigenvalues (Redman et al., arXiv 2302.09160).

Topologically conjugate dynamics share their Koopman spectrum. From a low-dimensional trajectory of each
run (CMD's mode profiles are a natural one: ``decomposition.profiles.T``), time-delay embed it, fit DMD
(PyDMD, the ``analysis`` extra), keep the leading eigenvalues, and compare two runs by the Wasserstein-1
distance between their eigenvalue sets: the mean distance under the optimal one-to-one matching
(scipy's ``linear_sum_assignment``). Equivalent runs come out closer than the spread between seeds of one
optimiser; non-equivalent ones farther.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["delay_embedding", "eigenvalue_distance", "koopman_eigenvalues", "seed_spread"]


def _as_series(series) -> np.ndarray:
    array = series.detach().cpu().double().numpy() if isinstance(series, torch.Tensor) else np.asarray(series, float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"series must be (T,) or (T, d), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("series has non-finite values")
    return array


def delay_embedding(series, delays: int) -> np.ndarray:
    """(T, d) -> (T - delays + 1, d * delays): row t holds ``series[t], ..., series[t + delays - 1]``."""
    array = _as_series(series)
    steps = len(array) - delays + 1
    if delays < 1 or steps < 2:
        raise ValueError(f"delays must be in [1, T - 1] for T = {len(array)}, got {delays}")
    return np.concatenate([array[i:i + steps] for i in range(delays)], axis=1)


def koopman_eigenvalues(series, delays: int = 8, rank: int = 8) -> np.ndarray:
    """The ``rank`` leading DMD eigenvalues (complex, (rank,)) of the delay-embedded ``series`` (T, d)."""
    from pydmd import DMD

    embedded = delay_embedding(series, delays)
    dmd = DMD(svd_rank=rank)
    with warnings.catch_warnings():  # a delay embedding is ill-conditioned by design; the SVD rank cuts it
        warnings.filterwarnings("ignore", message="Input data condition number")
        dmd.fit(embedded.T)
    return np.asarray(dmd.eigs)


def eigenvalue_distance(a, b) -> float:
    """Wasserstein-1 distance of two eigenvalue sets: mean |a_i - b_j| over the optimal matching.

    Sets of different sizes are matched on the smaller one's size.
    """
    a, b = np.asarray(a, complex).ravel(), np.asarray(b, complex).ravel()
    if not len(a) or not len(b):
        raise ValueError("eigenvalue sets must not be empty")
    cost = np.abs(a[:, None] - b[None, :])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def seed_spread(eigenvalue_sets) -> float:
    """Mean pairwise distance among the eigenvalue sets of runs that differ only in their seed."""
    pairs = list(itertools.combinations(eigenvalue_sets, 2))
    if not pairs:
        raise ValueError("seed_spread needs at least two runs")
    return float(np.mean([eigenvalue_distance(a, b) for a, b in pairs]))
