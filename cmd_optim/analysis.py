"""CMD of an existing training run, read from its checkpoints: ``cmd-optim analyze RUN_DIR``.

The checkpoints are Hugging Face Trainer ``checkpoint-*/`` folders (``model.safetensors`` or
``pytorch_model.bin``) or a folder of state_dict files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``),
taken in the order of the step numbers in their names. They are streamed: :class:`CheckpointTrajectory`
reads, for a chunk of columns, just those values from every file (memory-mapped), so the whole
trajectory is never held. The report: modes and their sizes per layer, the reconstruction error per
snapshot, the explained variance next to PCA with as many dimensions (the DLDR view), and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .clustering import abs_correlation
from .decomposition import ColumnSource, Decomposition, _chunks, decompose
from .sampling import sample_columns

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def find_checkpoints(run_dir) -> list[Path]:
    """The checkpoint files of ``run_dir`` in step order (the last number in each name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run folder: {run_dir}")
    step = lambda path: [int(n) for n in re.findall(r"\d+", path.name)][-1:] or [-1]  # noqa: E731
    folders = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir()), key=step)
    if folders:
        files = []
        for folder in folders:
            found = [folder / name for name in _WEIGHT_FILES if (folder / name).exists()]
            if not found:
                raise FileNotFoundError(f"{folder} holds none of {', '.join(_WEIGHT_FILES)}")
            files.append(found[0])
    else:
        files = sorted((p for p in run_dir.iterdir() if p.suffix in _SUFFIXES), key=step)
    if len(files) < 3:
        raise ValueError(f"{run_dir} has {len(files)} checkpoints; CMD needs at least 3")
    return files


class _Weights:
    """One checkpoint file's floating-point tensors, memory-mapped; ``read(name, start, stop)`` gives a flat range."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(path), framework="pt")
            self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}
            self._tensors = None
        else:
            self._tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(self._tensors, dict):
                raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
            self.shapes = {name: tuple(t.shape) for name, t in self._tensors.items()
                           if isinstance(t, torch.Tensor) and t.is_floating_point()}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name].reshape(-1)[start:stop].float()
        shape = self.shapes[name]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        if not shape:
            return self._file.get_tensor(name).reshape(-1).float()
        first, last = start // row, -(-stop // row)
        rows = self._file.get_slice(name)[first:last].reshape(-1).float()
        return rows[start - first * row: stop - first * row]


class CheckpointTrajectory(ColumnSource):
    """The (T, N) trajectory of the floating-point tensors common to all checkpoints, read on demand.

    Columns follow the first checkpoint's tensor order; ``names`` and ``sizes`` give the layers.
    """

    def __init__(self, paths, progress: bool = False):
        self.files = [_Weights(Path(p)) for p in paths]
        first = self.files[0].shapes
        self.names = [n for n in first if all(f.shapes.get(n) == first[n] for f in self.files[1:])]
        if not self.names:
            raise ValueError("the checkpoints share no floating-point tensor of one shape")
        self.sizes = [math.prod(first[n]) for n in self.names]
        self._offsets = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        self.shape = torch.Size((len(self.files), self._offsets[-1]))
        self._bar = _progress_bar("reading checkpoints", "values") if progress else None

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("CheckpointTrajectory reads whole columns: use trajectory[:, columns]")
        if isinstance(cols, slice):
            start, stop, _ = cols.indices(self.shape[1])
            out = torch.cat([self._read_range(f, start, stop)[None] for f in self.files])
        else:
            index = torch.as_tensor(cols).cpu()
            low, high = int(index.min()), int(index.max()) + 1
            if high - low <= 4 * len(index) + 1024:  # close together: one range, then pick
                out = self[:, slice(low, high)][:, index - low]
            else:
                out = torch.stack([torch.stack([self._read_range(f, int(i), int(i) + 1)[0] for i in index])
                                   for f in self.files])
        if self._bar is not None:
            self._bar.update(out.numel())
        return out

    def _read_range(self, weights: _Weights, start: int, stop: int) -> torch.Tensor:
        parts = []
        for name, low, high in zip(self.names, self._offsets, self._offsets[1:]):
            if high <= start or low >= stop:
                continue
            parts.append(weights.read(name, max(start, low) - low, min(stop, high) - low))
        return torch.cat(parts)


@dataclass
class Report:
    """What :func:`analyze` found; ``json.dumps(asdict(report))`` works."""
    checkpoints: list[str]
    num_params: int
    num_modes: int
    mode_sizes: list[int]
    layers: dict  # layer name -> parameters per mode
    relative_error: list[float]  # per snapshot
    explained_variance: float
    pca_explained_variance: float  # PCA with num_modes dimensions
    plots: list[str]


def analyze(run_dir, out_dir=None, modes: int = 10, samples: int = 1000, seed: int = 0,
            progress: bool = True) -> Report:
    """CMD of the run in ``run_dir``; writes report.md, report.json and PNG plots into ``out_dir``
    (default ``run_dir/cmd-analysis``) and returns the :class:`Report`."""
    paths = find_checkpoints(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "cmd-analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    trajectory = CheckpointTrajectory(paths, progress=progress)
    d = decompose(trajectory, modes=modes, samples=samples, seed=seed, layer_sizes=trajectory.sizes)
    errors = d.relative_error(trajectory).tolist()
    layers = {}
    for name, low, high in zip(trajectory.names, trajectory._offsets, trajectory._offsets[1:]):
        layers[name] = torch.bincount(d.assignment[low:high], minlength=d.num_modes).tolist()
    report = Report(
        checkpoints=[str(p) for p in paths], num_params=d.num_params, num_modes=d.num_modes,
        mode_sizes=d.mode_sizes.tolist(), layers=layers, relative_error=errors,
        explained_variance=d.explained_variance(trajectory),
        pca_explained_variance=pca_explained_variance(trajectory, d.num_modes), plots=[],
    )
    report.plots = _plots(d, trajectory, samples, seed, out_dir)
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=1))
    (out_dir / "report.md").write_text(_markdown(report))
    if trajectory._bar is not None:
        trajectory._bar.close()
    return report


def pca_explained_variance(trajectory, dims: int) -> float:
    """Share of the trajectory's variance (about each column's mean) in its top ``dims`` principal directions,
    from the (T, T) Gram matrix accumulated over column chunks."""
    num_snapshots = trajectory.shape[0]
    gram = torch.zeros(num_snapshots, num_snapshots, dtype=torch.float64)
    for cols in _chunks(trajectory.shape):
        x = trajectory[:, cols].double()
        x = x - x.mean(dim=0)
        gram += x @ x.T
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    total = float(eigenvalues.sum())
    return float(eigenvalues[:dims].sum()) / total if total > 0 else 1.0


def _plots(d: Decomposition, trajectory, samples: int, seed: int, out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sampled = sample_columns(d.num_params, min(samples, d.num_params), trajectory.sizes,
                             torch.Generator().manual_seed(seed))
    order = sampled[torch.argsort(d.assignment[sampled], stable=True)]
    corr, _ = abs_correlation(trajectory[:, order].double())
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(corr.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set(title="|corr| of sampled parameters, ordered by mode", xlabel="parameter", ylabel="parameter")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(out_dir / "correlation.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, profile in enumerate(d.profiles.cpu()):
        ax.plot(((profile - profile.mean()) / profile.std().clamp_min(1e-12)).numpy(), label=f"mode {m}")
    ax.set(title="mode time profiles (standardised)", xlabel="checkpoint", ylabel="reference value")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "profiles.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.3 * len(trajectory.names) + 2))
    left = torch.zeros(len(trajectory.names))
    counts = torch.stack([torch.bincount(d.assignment[lo:hi], minlength=d.num_modes).float() / (hi - lo)
                          for lo, hi in zip(trajectory._offsets, trajectory._offsets[1:])])
    for m in range(d.num_modes):
        ax.barh(range(len(trajectory.names)), counts[:, m].numpy(), left=left.numpy(), label=f"mode {m}")
        left += counts[:, m]
    ax.set_yticks(range(len(trajectory.names)), trajectory.names, fontsize=6)
    ax.set(title="make-up of each layer by mode", xlabel="share of the layer's parameters")
    ax.legend(fontsize=6, ncol=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=110)
    plt.close(fig)
    return ["correlation.png", "profiles.png", "layers.png"]


def _markdown(r: Report) -> str:
    rows = "\n".join(f"| {name} | {sum(counts):,} | {' / '.join(str(c) for c in counts)} |" for name, counts in r.layers.items())
    errors = " ".join(f"{e:.4f}" for e in r.relative_error)
    return f"""# CMD analysis

{len(r.checkpoints)} checkpoints, {r.num_params:,} parameters, {r.num_modes} modes (sizes {r.mode_sizes}).

Explained variance: CMD {r.explained_variance:.4f}; PCA with {r.num_modes} dimensions {r.pca_explained_variance:.4f}.

Relative reconstruction error per checkpoint: {errors}

| layer | parameters | per mode |
|---|---|---|
{rows}

{chr(10).join(f"![{p}]({p})" for p in r.plots)}
"""


def _progress_bar(label: str, unit: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc=label, unit=unit, unit_scale=True, leave=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cmd-optim analyze", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="report folder (default RUN_DIR/cmd-analysis)")
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = analyze(args.run_dir, args.out, args.modes, args.samples, args.seed)
    out = Path(args.out) if args.out else Path(args.run_dir) / "cmd-analysis"
    print(f"{len(report.checkpoints)} checkpoints, {report.num_params:,} parameters, {report.num_modes} modes; "
          f"explained variance CMD {report.explained_variance:.4f}, PCA {report.pca_explained_variance:.4f}; "
          f"report in {out}")
