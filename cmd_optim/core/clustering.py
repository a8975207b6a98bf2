"""Grouping sampled trajectories into modes and choosing each mode's reference."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

__all__ = ["abs_correlation", "cluster_references"]


def abs_correlation(columns: torch.Tensor, resolution: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """|Pearson correlation| among the columns of ``columns`` (T, K).

    Returns the (K, K) matrix and a (K,) bool mask of the constant columns, whose correlation with
    every column (themselves included) is defined as 0. A column counts as constant when its range is
    at most 32 rounding steps of its magnitude (``resolution``: the machine epsilon of the dtype the
    values were stored in, by default that of ``columns``): a parameter that moved by a few rounding
    steps is a staircase that correlates with any monotone trajectory, and must not become a reference.
    """
    resolution = torch.finfo(columns.dtype).eps if resolution is None else resolution
    shifted = columns - columns[0]  # exact zeros for constant columns, whatever the rounding of a mean
    spread = shifted.amax(dim=0) - shifted.amin(dim=0)
    constant = spread <= 32 * resolution * columns.abs().amax(dim=0)
    centered = shifted - shifted.mean(dim=0)
    norms = centered.norm(dim=0)
    constant |= norms <= torch.finfo(columns.dtype).tiny
    unit = centered / torch.where(constant, torch.ones_like(norms), norms)
    unit[:, constant] = 0
    return (unit.T @ unit).abs().clamp_(max=1.0), constant


def cluster_references(corr: torch.Tensor, constant: torch.Tensor, modes: int) -> torch.Tensor:
    """Reference columns of at most ``modes`` clusters of the sampled trajectories.

    The constant columns are set aside (they correlate with nothing); each remaining row of ``corr``
    (K, K) is a point, and complete-linkage hierarchical clustering on Euclidean distances between rows
    is cut into at most ``modes`` clusters. A cluster's reference is the member with the highest mean
    |corr| to the other members. Only when every column is constant is one of them the single reference.

    Returns a LongTensor of indices into the K sampled columns (on the CPU), one per mode, ordered
    by cluster size (largest first), then by index.
    """
    corr = corr.cpu().double()
    informative = torch.nonzero(~constant.cpu()).flatten()
    if informative.numel() == 0:
        return torch.zeros(1, dtype=torch.long)
    corr = corr[informative][:, informative]
    k = corr.shape[0]
    if k == 1 or modes == 1:
        labels = np.ones(k, dtype=np.int64)
    else:
        condensed = squareform(torch.cdist(corr, corr).numpy(), checks=False)
        labels = fcluster(linkage(condensed, method="complete"), t=modes, criterion="maxclust")
    candidates = []
    for label in np.unique(labels):
        members = torch.from_numpy(np.flatnonzero(labels == label))
        block = corr[members][:, members]
        score = (block.sum(dim=1) - block.diagonal()) / max(len(members) - 1, 1)
        candidates.append((len(members), int(informative[members[int(score.argmax())]])))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return torch.tensor([index for _, index in candidates], dtype=torch.long)
