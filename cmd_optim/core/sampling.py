"""Choosing which parameter trajectories the clustering sees."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sample_columns"]


def sample_columns(
    num_columns: int,
    samples: int,
    layer_sizes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick ``min(samples, num_columns)`` distinct column indices, sorted, as a CPU LongTensor.

    Without ``layer_sizes`` the columns are drawn uniformly. With them (consecutive blocks of
    columns summing to ``num_columns``), half of the budget is split evenly across the layers and
    half in proportion to their sizes, so that small layers (biases, norms) are represented too.
    A layer never gets more samples than it has columns; what it cannot take goes to the others.
    """
    budget = min(samples, num_columns)
    if layer_sizes is None:
        return _distinct(num_columns, budget, generator).sort().values
    sizes = [int(s) for s in layer_sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != num_columns:
        raise ValueError(
            f"layer_sizes must be non-negative and sum to the number of columns ({num_columns}), "
            f"got {len(sizes)} sizes summing to {sum(sizes)}"
        )
    quotas = _layer_quotas(sizes, budget)
    picks, offset = [], 0
    for size, quota in zip(sizes, quotas):
        picks.append(_distinct(size, quota, generator) + offset)
        offset += size
    return torch.cat(picks).sort().values


def _layer_quotas(sizes: list[int], budget: int) -> list[int]:
    """Samples per layer: half evenly, half by size, capped by each size, summing to ``budget``."""
    total = sum(sizes)
    even = (budget // 2) // len(sizes)
    proportional = budget - even * len(sizes)
    quotas = [min(size, even + (proportional * size) // total) for size in sizes]
    # Rounding and caps leave a remainder: hand it out to the layers with the most room left.
    remainder = budget - sum(quotas)
    while remainder > 0:
        room = [size - quota for size, quota in zip(sizes, quotas)]
        order = sorted(range(len(sizes)), key=lambda i: -room[i])
        for i in order:
            if remainder == 0 or room[i] == 0:
                break
            quotas[i] += 1
            remainder -= 1
    return quotas


def _distinct(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` distinct integers drawn uniformly from ``[0, n)``, without an O(n) permutation when k << n."""
    if 8 * k >= n:
        return torch.randperm(n, generator=generator)[:k]
    while True:  # rejection of duplicates: with k < n / 8, one draw almost always suffices
        draws = torch.randint(n, (2 * k,), generator=generator).unique()
        if draws.numel() >= k:
            return draws[torch.randperm(draws.numel(), generator=generator)[:k]]
