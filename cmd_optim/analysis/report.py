"""CMD of an existing training run, read from its checkpoints: :func:`analyze` and its :class:`Report`.

The checkpoints are streamed (:class:`~cmd_optim.analysis.checkpoints.CheckpointTrajectory`), so the
whole trajectory is never held. The report: modes and their sizes per layer, the reconstruction error per
checkpoint, the explained variance next to PCA with as many dimensions (the DLDR view), and PNG plots.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import chunks, decompose
from ._plotting import write_plots
from .checkpoints import CheckpointTrajectory, _scan

__all__ = ["Report", "analyze", "pca_explained_variance"]

_NO_PLOTS = "no plots written: matplotlib is not installed (pip install 'cmd-optim[plot]')"


@dataclass
class Report:
    """What :func:`analyze` found; ``json.dumps(asdict(report))`` works."""

    checkpoints: list[str]
    steps: list[int]
    steps_known: bool  # training steps (recorded, checkpoint-N, step=N), not just numbers in the names
    skipped: list[str]  # files not analysed: step unknown, or a step another file has
    num_params: int
    num_modes: int
    mode_sizes: list[int]
    layers: dict  # layer name -> parameters per mode
    relative_error: list[float]  # per checkpoint
    explained_variance: float
    pca_dims: int  # PCA dimensions compared: as many as modes, at most checkpoints - 1
    pca_explained_variance: float
    plots: list[str]

    @property
    def pca_is_trivial(self) -> bool:
        """With T checkpoints, T - 1 principal directions reproduce the trajectory exactly."""
        return self.pca_dims >= len(self.checkpoints) - 1


def analyze(run_dir, out_dir=None, modes: int = 10, samples: int = 1000, seed: int = 0,
            progress: bool = True, chunk_elements: int | None = None) -> Report:
    """CMD of the run in ``run_dir``; writes report.md, report.json and PNG plots (with matplotlib) into
    ``out_dir`` (default ``run_dir/cmd-analysis``) and returns the :class:`Report`. Warns of the checkpoint
    files skipped; an unreadable checkpoint raises ValueError, an unwritable ``out_dir`` OSError, naming it."""
    files, skipped = _scan(run_dir)
    paths = [weights.path for weights in files]
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "cmd-analysis"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the report folder {out_dir}: {error.strerror or error}") from error
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"cannot write into the report folder {out_dir}")
    trajectory = CheckpointTrajectory(files, progress=progress, chunk_elements=chunk_elements)
    d = decompose(trajectory, modes=modes, samples=samples, seed=seed, layer_sizes=trajectory.sizes, measure=True)
    pca_dims = min(d.num_modes, len(paths) - 1)
    if pca_dims >= len(paths) - 1:
        warnings.warn(f"{len(paths)} checkpoints: PCA with {pca_dims} dimensions reproduces them exactly, so the "
                      "CMD-against-PCA comparison says nothing; analyze more checkpoints or fewer modes", stacklevel=2)
    layers = {name: torch.bincount(d.assignment[low:high], minlength=d.num_modes).tolist()
              for name, low, high in zip(trajectory.names, trajectory.offsets, trajectory.offsets[1:])}
    report = Report(
        checkpoints=[str(p) for p in paths], steps=trajectory.steps, steps_known=trajectory.steps_known,
        skipped=[str(p) for p in skipped],
        num_params=d.num_params, num_modes=d.num_modes, mode_sizes=d.mode_sizes.tolist(), layers=layers,
        relative_error=d.fit_quality.relative_error.tolist(), explained_variance=d.fit_quality.explained_variance,
        pca_dims=pca_dims, pca_explained_variance=pca_explained_variance(trajectory, pca_dims), plots=[],
    )
    report.plots = write_plots(d, trajectory, samples, seed, out_dir)
    if not report.plots:
        warnings.warn(_NO_PLOTS, stacklevel=2)
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=1))
    (out_dir / "report.md").write_text(_markdown(report))
    trajectory.close()
    return report


def pca_explained_variance(trajectory, dims: int) -> float:
    """Share of the trajectory's variance (about each column's mean) in its top ``dims`` principal directions,
    from the (T, T) Gram matrix accumulated over column chunks."""
    num_snapshots = trajectory.shape[0]
    gram = torch.zeros(num_snapshots, num_snapshots, dtype=torch.float64)
    for cols in chunks(trajectory):
        x = trajectory[:, cols].double()
        x = x - x.mean(dim=0)
        gram += x @ x.T
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    total = float(eigenvalues.sum())
    return float(eigenvalues[:dims].sum()) / total if total > 0 else 1.0


def _markdown(r: Report) -> str:
    rows = "\n".join(f"| {name} | {sum(counts):,} | {' / '.join(str(c) for c in counts)} |"
                     for name, counts in r.layers.items())
    errors = " ".join(f"{e:.3g}" for e in r.relative_error)
    pca = f"PCA with {r.pca_dims} dimensions {r.pca_explained_variance:.4f}"
    if r.pca_is_trivial:
        pca += f" (exact by construction with {len(r.checkpoints)} checkpoints: not a comparison)"
    span = f"{r.steps[0]} to {r.steps[-1]}"
    span = f"steps {span}" if r.steps_known else f"numbered {span} by their names"
    skipped = f" Skipped (step unknown or another file's): {', '.join(r.skipped)}." if r.skipped else ""
    return f"""# CMD analysis

{len(r.checkpoints)} checkpoints ({span}), {r.num_params:,} parameters, \
{r.num_modes} modes (sizes {r.mode_sizes}).{skipped}

Explained variance: CMD {r.explained_variance:.4f}; {pca}.

Relative reconstruction error per checkpoint: {errors}

| layer | parameters | per mode |
|---|---|---|
{rows}

{chr(10).join(f"![{p}]({p})" for p in r.plots) or _NO_PLOTS.capitalize() + "."}
"""
