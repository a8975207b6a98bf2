"""Grouping sampled trajectories into modes and choosing each mode's reference."""
from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def abs_correlation(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|Pearson correlation| among the columns of ``columns`` (T, K).

    Returns the (K, K) matrix and a (K,) bool mask of the constant columns, whose correlation with
    every column (themselves included) is defined as 0.
    """
    shifted = columns - columns[0]  # exact zeros for constant columns, whatever the rounding of a mean
    centered = shifted - shifted.mean(dim=0)
    norms = centered.norm(dim=0)
    constant = norms <= torch.finfo(columns.dtype).tiny
    unit = centered / torch.where(constant, torch.ones_like(norms), norms)
    unit[:, constant] = 0
    return (unit.T @ unit).abs().clamp_(max=1.0), constant


def cluster_references(corr: torch.Tensor, constant: torch.Tensor, modes: int) -> torch.Tensor:
    """Reference columns of at most ``modes`` clusters of the sampled trajectories.

    Each row of ``corr`` (K, K) is a point; complete-linkage hierarchical clustering on Euclidean
    distances between rows is cut into at most ``modes`` clusters. A cluster's reference is the
    member with the highest mean |corr| to the other members (constant members never qualify).
    Clusters made only of constant columns are dropped unless nothing else is left.

    Returns a LongTensor of indices into the K sampled columns (on the CPU), one per mode, ordered
    by cluster size (largest first), then by index.
    """
    k = corr.shape[0]
    if k == 1 or modes == 1:
        labels = np.ones(k, dtype=np.int64)
    else:
        distances = torch.cdist(corr, corr).cpu().double().numpy()
        condensed = squareform(distances, checks=False)
        labels = fcluster(linkage(condensed, method="complete"), t=modes, criterion="maxclust")
    corr = corr.cpu().double()
    constant = constant.cpu()
    candidates = []
    for label in np.unique(labels):
        members = torch.from_numpy(np.flatnonzero(labels == label))
        block = corr[members][:, members]
        if len(members) > 1:
            score = (block.sum(dim=1) - block.diagonal()) / (len(members) - 1)
        else:
            score = torch.zeros(1, dtype=corr.dtype)
        score[constant[members]] = -1.0
        best = int(score.argmax())
        candidates.append((not bool(constant[members[best]]), len(members), int(members[best])))
    if any(informative for informative, _, _ in candidates):
        candidates = [c for c in candidates if c[0]]
    candidates.sort(key=lambda c: (-c[1], c[2]))
    return torch.tensor([index for _, _, index in candidates], dtype=torch.long)
