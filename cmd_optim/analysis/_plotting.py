"""The report's PNG plots (matplotlib, the ``plot`` extra; without it no plots are written)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import Decomposition, abs_correlation, sample_columns

__all__ = ["pyplot", "write_plots"]


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(d: Decomposition, trajectory, samples: int, seed: int, out_dir: Path) -> list[str]:
    """correlation.png, profiles.png and layers.png into ``out_dir``; returns their names."""
    plt = pyplot()
    if plt is None:
        return []
    colors = plt.get_cmap("tab20" if d.num_modes > 10 else "tab10")
    sampled = sample_columns(d.num_params, min(samples, d.num_params), trajectory.sizes,
                             torch.Generator().manual_seed(seed))
    modes = d.assignment[sampled]
    order = torch.argsort(modes, stable=True)
    corr, _ = abs_correlation(trajectory[:, sampled[order]].double())
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(corr.numpy(), cmap="viridis", vmin=0, vmax=1)
    bounds = torch.cumsum(torch.bincount(modes, minlength=d.num_modes), 0).tolist()
    for start, stop in zip([0, *bounds], bounds):
        if stop > start:
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False,
                                       edgecolor="white", linewidth=0.6))
    ax.set(title="|corr| of sampled parameters, ordered by mode (boxes: modes)", xlabel="parameter",
           ylabel="parameter")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(out_dir / "correlation.png", dpi=110)
    plt.close(fig)

    steps = getattr(trajectory, "steps", list(range(trajectory.shape[0])))
    fig, axes = plt.subplots(d.num_modes, 1, figsize=(6, 1.1 * d.num_modes + 1), sharex=True, squeeze=False)
    for m, (ax, profile) in enumerate(zip(axes[:, 0], d.profiles.cpu())):
        ax.plot(steps, profile.numpy(), color=colors(m % colors.N))
        ax.set_ylabel(f"mode {m}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_title("reference value of each mode")
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(out_dir / "profiles.png", dpi=110)
    plt.close(fig)

    names = trajectory.names
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 2))
    counts = torch.stack([torch.bincount(d.assignment[lo:hi], minlength=d.num_modes).float() / (hi - lo)
                          for lo, hi in zip(trajectory.offsets, trajectory.offsets[1:])])
    rows = list(range(len(names)))[::-1]  # first layer at the top
    left = torch.zeros(len(names))
    for m in range(d.num_modes):
        ax.barh(rows, counts[:, m].numpy(), left=left.numpy(), label=f"mode {m}", color=colors(m % colors.N))
        left += counts[:, m]
    ax.set_yticks(rows, names, fontsize=6)
    ax.set(title="make-up of each layer by mode", xlabel="share of the layer's parameters")
    ax.legend(fontsize=6, ncol=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=110)
    plt.close(fig)
    return ["correlation.png", "profiles.png", "layers.png"]
