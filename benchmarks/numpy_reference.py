"""A straightforward NumPy version of batch CMD: the yardstick for ``cmd_optim.decompose``.

It follows the same algorithm on the whole (T, N) array at once, the way a first implementation
(and the paper's own code) would: full-size centered copies and a gathered reference matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage


def decompose_numpy(trajectory: np.ndarray, modes: int, samples: int, seed: int = 0):
    """Returns (assignment, a, b, references) for a (T, N) array."""
    _, num_params = trajectory.shape
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(num_params, size=min(samples, num_params), replace=False))
    corr = np.nan_to_num(np.abs(np.corrcoef(trajectory[:, sampled].T)))
    labels = fcluster(linkage(corr, method="complete", metric="euclidean"), t=modes, criterion="maxclust")
    references = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        block = corr[np.ix_(members, members)]
        score = (block.sum(1) - block.diagonal()) / max(len(members) - 1, 1)
        references.append(sampled[members[score.argmax()]])
    references = np.array(references)
    centered = trajectory - trajectory.mean(0)
    ref_centered = centered[:, references]
    ref_norm = np.linalg.norm(ref_centered, axis=0)
    corr_all = (ref_centered.T @ centered) / (ref_norm[:, None] * np.linalg.norm(centered, axis=0) + 1e-30)
    assignment = np.abs(corr_all).argmax(0)
    profile = ref_centered[:, assignment]
    a = (profile * centered).sum(0) / (ref_norm**2)[assignment]
    b = trajectory.mean(0) - a * trajectory[:, references].mean(0)[assignment]
    return assignment, a, b, references
