"""The report's PNG plots (matplotlib, the ``plot`` extra; without it no plots are written)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import Decomposition, abs_correlation, sample_columns

__all__ = ["pyplot", "write_plots"]

#: layers.png shows at most this many layers, the largest (report.md lists them all).
LAYERS_SHOWN = 40


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
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    image = ax.imshow(corr.numpy(), cmap="viridis", vmin=0, vmax=1)
    bounds = torch.cumsum(torch.bincount(modes, minlength=d.num_modes), 0).tolist()
    for start, stop in zip([0, *bounds], bounds):
        if stop > start:
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False,
                                       edgecolor="white", linewidth=0.6))
    ax.set(title="|corr| of sampled parameters, ordered by mode\n(a box per mode)", xlabel="parameter",
           ylabel="parameter")
    fig.colorbar(image)
    fig.savefig(out_dir / "correlation.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(d.num_modes, 1, figsize=(6, 1.1 * d.num_modes + 1), sharex=True, squeeze=False,
                             layout="constrained")
    for m, (ax, profile) in enumerate(zip(axes[:, 0], d.profiles.cpu())):
        ax.plot(trajectory.steps, profile.numpy(), color=colors(m % colors.N))
        ax.set_ylabel(f"mode {m}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_title("reference value of each mode")
    axes[-1, 0].set_xlabel("training step" if trajectory.steps_known else "checkpoint (the number in its name)")
    fig.savefig(out_dir / "profiles.png", dpi=110)
    plt.close(fig)

    sizes = torch.tensor(trajectory.sizes)
    shown = sorted(torch.argsort(sizes, descending=True, stable=True)[:LAYERS_SHOWN].tolist())
    counts = torch.stack([torch.bincount(d.assignment[trajectory.offsets[i]:trajectory.offsets[i + 1]],
                                         minlength=d.num_modes).float() / sizes[i] for i in shown])
    title = ("make-up of each layer by mode" if len(shown) == len(sizes) else
             f"make-up of the {len(shown)} largest of {len(sizes)} layers by mode")
    fig, ax = plt.subplots(figsize=(7, 0.25 * max(len(shown), 10) + 1.5), layout="constrained")
    rows = list(range(len(shown)))[::-1]  # first layer at the top
    left = torch.zeros(len(shown))
    for m in range(d.num_modes):
        ax.barh(rows, counts[:, m].numpy(), left=left.numpy(), label=f"mode {m}", color=colors(m % colors.N))
        left += counts[:, m]
    ax.set_yticks(rows, [trajectory.names[i] for i in shown], fontsize=7)
    ax.set(title=title, xlabel="share of the layer's parameters")
    ax.margins(y=0.01)
    ax.legend(fontsize=7, ncols=-(-d.num_modes // 10), loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(out_dir / "layers.png", dpi=110)
    plt.close(fig)
    return ["correlation.png", "profiles.png", "layers.png"]
