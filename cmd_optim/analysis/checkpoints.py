"""Reading a training run's checkpoints as one trajectory, a chunk of columns at a time.

A run folder holds Hugging Face Trainer ``checkpoint-*/`` folders (``model.safetensors`` or
``pytorch_model.bin``) or checkpoint files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, Lightning's
``.ckpt``), taken in the order of their steps: the ``global_step`` a torch file records (Lightning's), else
the number after ``step`` in the (folder's) name, or its only number. Files whose step cannot be told
(Lightning's ``last.ckpt``) or is another file's (Lightning's ``-v1`` copies) are skipped, with a warning.
A torch file may hold the state_dict itself or nest it one level down (``{"model": state_dict,
"optimizer": ...}``, Lightning's ``{"state_dict": ...}``); one that cannot be read raises ValueError naming it.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..core import ColumnSource

__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointTrajectory", "checkpoint_step", "find_checkpoints"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: The file suffixes a run folder's checkpoints may have.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_VERSION = re.compile(r"-v\d+$")  # Lightning's suffix for a second file of one name
_LIGHTNING_COPY = re.compile(r"^last(-v\d+)?$|-v\d+$")  # last.ckpt, and a second file of one name
_STEP = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)


def _name_step(path: Path) -> int | None:
    """The step in a checkpoint's (Trainer folder's) name: the number after ``step``, else its only number."""
    name = _VERSION.sub("", path.parent.name if path.name in _WEIGHT_FILES else path.stem)
    after_step = _STEP.search(name)
    if after_step:
        return int(after_step.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[0]) if len(numbers) == 1 else None


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was written at: the ``global_step`` it records, else its name's; None if unknown."""
    return _Weights(Path(path)).step


def find_checkpoints(run_dir) -> list[Path]:
    """The checkpoint files of ``run_dir`` in step order, one per step; warns of the files skipped."""
    return [weights.path for weights in _scan(run_dir)[0]]


def _scan(run_dir) -> tuple[list[_Weights], list[Path]]:
    """The checkpoints of ``run_dir`` in step order, opened (each file read once, for its step and its tensors),
    and the files skipped (warned of as at the caller's caller)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run folder: {run_dir}")
    folders = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    if folders:
        files = []
        for folder in folders:
            found = [folder / name for name in _WEIGHT_FILES if (folder / name).exists()]
            if not found:
                raise FileNotFoundError(f"{folder} holds none of {', '.join(_WEIGHT_FILES)}")
            files.append(found[0])
    else:
        files = sorted(p for p in run_dir.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    opened = {path: _Weights(path) for path in files}
    steps = {path: weights.step for path, weights in opened.items()}

    def rank(path):  # of several files of one step, the one whose name gives it, not a Lightning copy, is kept
        return _name_step(path) != steps[path], bool(_LIGHTNING_COPY.search(path.stem)), path.name

    by_step = {}
    for path in sorted(files, key=rank):
        if steps[path] is not None:
            by_step.setdefault(steps[path], path)
    kept = [by_step[step] for step in sorted(by_step)]
    skipped = [path for path in files if path not in kept]
    unknown = [_shown(p) for p in skipped if steps[p] is None]
    notes = [f"{', '.join(unknown)} (no step recorded or in the name)"] if unknown else []
    notes += [f"{_shown(p)} (step {steps[p]}, already {_shown(by_step[steps[p]])})"
              for p in skipped if steps[p] is not None]
    if len(kept) < 3:
        raise ValueError(f"{run_dir} has {len(kept)} checkpoints (Trainer checkpoint-* folders or files ending in "
                         f"{', '.join(CHECKPOINT_SUFFIXES)}); CMD needs at least 3"
                         + (f"; skipped {'; '.join(notes)}" if notes else ""))
    if notes:
        warnings.warn(f"{run_dir}: skipped {'; '.join(notes)}", stacklevel=3)
    return [opened[path] for path in kept], skipped


def _shown(path: Path) -> str:
    """A checkpoint as the messages name it: its file, or its Trainer folder."""
    return path.parent.name if path.name in _WEIGHT_FILES else path.name


class _Weights:
    """One checkpoint file's floating-point tensors, memory-mapped; ``read(name, start, stop)`` gives a flat range.

    ``step`` is the step it was written at (see :func:`checkpoint_step`); ``step_known`` says whether it is a
    training step (recorded, or named as one: ``checkpoint-N``, ``step=N``), not just a number in the name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step = _name_step(path)
        self.step_known = path.name in _WEIGHT_FILES or bool(_STEP.search(path.stem))
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._file = safe_open(str(path), framework="pt")
            except SafetensorError as error:
                raise ValueError(f"cannot read {path}: corrupt or truncated ({error})") from error
            self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}
            self._tensors = None
            return
        loaded = _torch_load(path)
        recorded = loaded.get("global_step") if isinstance(loaded, dict) else None  # Lightning's
        if isinstance(recorded, int) and not isinstance(recorded, bool):
            self.step, self.step_known = recorded, True
        self._tensors = _state_dict_in(loaded, path)
        self.shapes = {name: tuple(t.shape) for name, t in self._tensors.items()
                       if isinstance(t, torch.Tensor) and t.is_floating_point()}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name].reshape(-1)[start:stop].float()
        shape = self.shapes[name]
        if not shape:
            return self._file.get_tensor(name).reshape(-1).float()
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        rows = self._file.get_slice(name)[first:last].reshape(-1).float()
        return rows[start - first * row: stop - first * row]


def _torch_load(path: Path):
    """``torch.load`` of ``path``, memory-mapped and tensors only; a file it cannot read raises ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met a pickled Python object (or a corrupt pickle)
        reason = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?=\s|$)", str(error))
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True), which loads no pickled Python "
                         f"objects: {reason.group(1) if reason else str(error).splitlines()[0]}") from error
    except RuntimeError as error:
        reason = str(error).split(". ")[0]
        raise ValueError(f"cannot read {path}: corrupt or truncated, or not saved by torch.save ({reason})") from error


def _state_dict_in(loaded, path: Path) -> dict:
    """The dict of tensors in a loaded torch file: the file itself, or one nested under a usual key."""
    if isinstance(loaded, dict) and any(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    if isinstance(loaded, dict):
        for key in _NESTED_KEYS:
            if isinstance(loaded.get(key), dict) and any(isinstance(v, torch.Tensor) for v in loaded[key].values()):
                return loaded[key]
    keys = list(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
    raise ValueError(f"{path} holds no state_dict (a dict of tensors, itself or under one of "
                     f"{', '.join(_NESTED_KEYS)}); found {keys}")


class CheckpointTrajectory(ColumnSource):
    """The (T, N) trajectory of the floating-point tensors common to all checkpoints (``paths``, or files
    :func:`_scan` opened), read on demand.

    Columns follow the first checkpoint's tensor order (or ``names``, if given); ``names`` and ``sizes``
    give the layers, ``steps`` the step of each checkpoint (None if unknown), ``steps_known`` whether they are
    all training steps (recorded, or named as such) rather than numbers in the names (epochs, perhaps).
    ``chunk_elements`` sets how many values one read covers.
    """

    def __init__(self, paths, progress: bool = False, chunk_elements: int | None = None,
                 names: list[str] | None = None) -> None:
        self.files = [p if isinstance(p, _Weights) else _Weights(Path(p)) for p in paths]
        self.steps = [f.step for f in self.files]
        self.steps_known = all(f.step_known for f in self.files)
        first = self.files[0].shapes
        common = [n for n in first if all(f.shapes.get(n) == first[n] for f in self.files[1:])]
        if names is not None:
            absent = [n for n in names if n not in common]
            if absent:
                raise ValueError(f"tensor {absent[0]!r} is not in every checkpoint with one shape")
            common = list(names)
        self.names = common
        if not self.names:
            raise ValueError("the checkpoints share no floating-point tensor of one shape")
        self.sizes = [math.prod(first[n]) for n in self.names]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.shape = torch.Size((len(self.files), self.offsets[-1]))
        if chunk_elements is not None:
            self.chunk_elements = chunk_elements
        self.progress = _progress_bar("reading checkpoints", "values") if progress else None

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
        if self.progress is not None:
            self.progress.update(out.numel())
        return out

    def row(self, index: int) -> torch.Tensor:
        """Checkpoint ``index`` as one (N,) vector (a whole row: one checkpoint's tensors, read once)."""
        return self._read_range(self.files[index], 0, self.shape[1])

    def _read_range(self, weights: _Weights, start: int, stop: int) -> torch.Tensor:
        parts = []
        for name, low, high in zip(self.names, self.offsets, self.offsets[1:]):
            if high <= start or low >= stop:
                continue
            parts.append(weights.read(name, max(start, low) - low, min(stop, high) - low))
        return torch.cat(parts)

    def close(self) -> None:
        """Close the progress bar, if any."""
        if self.progress is not None:
            self.progress.close()


def _progress_bar(label: str, unit: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(desc=label, unit=unit, unit_scale=True, leave=False)
