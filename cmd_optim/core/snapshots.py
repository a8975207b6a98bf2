"""Recording a trajectory of a list of parameters: in memory on a device, or in a file off the heap."""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import torch

from .decomposition import ColumnSource
from .layout import FlatLayout

__all__ = ["SnapshotBuffer", "SnapshotFile"]


class SnapshotBuffer:
    """Storage for up to ``capacity`` flattened snapshots (rows of N values) of ``params``.

    In memory (``directory=None``): a preallocated (capacity, N) tensor on ``device``, ``capacity * N *
    itemsize`` bytes. In a file (``directory`` a folder): each snapshot is written as one row of a file in
    that folder as it is taken (a parameter at a time, so only the largest parameter is ever copied), and
    :meth:`trajectory` reads it back as a :class:`SnapshotFile`, a chunk of columns at a time; the file is
    deleted by :meth:`release`.
    """

    def __init__(self, params, capacity: int, device="cpu", dtype=torch.float32, directory=None) -> None:
        self.params = list(params)
        self.layout = FlatLayout(self.params)
        self.capacity, self.dtype = capacity, dtype
        self.count = 0
        self.file: SnapshotFile | None = None
        if directory is None:
            self.data = torch.empty(capacity, self.layout.numel, device=device, dtype=dtype)
        else:
            self.data = None
            self.file = SnapshotFile.create(directory, self.layout.numel, dtype)

    @torch.no_grad()
    def record(self, tensors=None) -> None:
        """Append the current values of ``params`` (or of ``tensors``, shaped like them). A value the snapshot
        dtype cannot hold (a finite weight beyond float16's 65504) raises here, not after the warm-up."""
        if self.count == self.capacity:
            raise RuntimeError(f"snapshot buffer is full ({self.count} snapshots)")
        tensors = self.params if tensors is None else list(tensors)
        if self.file is None:
            rows = [self.layout.flatten(tensors, out=self.data[self.count])]
        else:
            rows = []
            for t, (start, _) in zip(tensors, self.layout.ranges()):
                piece = t.detach().reshape(-1).to("cpu", self.dtype)
                self.file.write(self.count, start, piece)
                rows.append(piece)
        if self.dtype.itemsize < 4 and not all(bool(torch.isfinite(row).all()) for row in rows):
            _raise_unrepresentable(tensors, self.dtype)
        self.count += 1
        if self.file is not None:
            self.file.rows = self.count

    def load(self, trajectory) -> None:
        """Take over saved snapshots: a (count, N) tensor, or a :class:`SnapshotFile` (copied a row at a time)."""
        if isinstance(trajectory, torch.Tensor) and trajectory.ndim != 2:
            raise ValueError(f"saved snapshots must be 2-D, got shape {tuple(trajectory.shape)}")
        count, width = trajectory.shape
        if width != self.layout.numel or count > self.capacity:
            raise ValueError(f"saved snapshots have shape {tuple(trajectory.shape)}; this optimizer records up to "
                             f"({self.capacity}, {self.layout.numel})")
        for row in range(count):
            values = trajectory.row(row) if isinstance(trajectory, SnapshotFile) else trajectory[row]
            if self.file is None:
                self.data[row].copy_(values)
            else:
                self.file.write(row, 0, values.to("cpu", self.dtype))
        self.count = count
        if self.file is not None:
            self.file.rows = count

    def trajectory(self) -> torch.Tensor | SnapshotFile:
        """The recorded (count, N) trajectory: a view of the memory, or the file as a ColumnSource."""
        return self.data[: self.count] if self.file is None else self.file

    def saved(self) -> torch.Tensor | dict:
        """What a state_dict keeps: the snapshots themselves, or for a file a lasting name of its rows so far
        (:meth:`SnapshotFile.keep`) and their description."""
        if self.file is None:
            return self.trajectory().clone()
        return {"file": str(self.file.keep(self.count)), "rows": self.count, "numel": self.layout.numel,
                "dtype": str(self.dtype)}

    @property
    def nbytes(self) -> int:
        """Memory the snapshots take (0 for a file)."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    @property
    def disk_bytes(self) -> int:
        return 0 if self.file is None else self.count * self.layout.numel * self.dtype.itemsize

    def release(self) -> None:
        if self.file is not None:
            self.file.delete()
        else:
            self.data = self.data.new_empty(0, self.data.shape[1])


def open_saved(saved) -> torch.Tensor | SnapshotFile:
    """The snapshots a state_dict names (:meth:`SnapshotBuffer.saved`): the tensor, or the file reopened."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not isinstance(saved, dict) or not {"file", "rows", "numel", "dtype"} <= set(saved):
        raise ValueError("the state_dict's snapshots are neither a tensor nor a snapshot file's description")
    dtype = getattr(torch, str(saved["dtype"]).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the state_dict's snapshot file has an unknown dtype {saved['dtype']!r}")
    return SnapshotFile.open(saved["file"], int(saved["numel"]), dtype, int(saved["rows"]))


def _raise_unrepresentable(tensors, dtype) -> None:
    for p in tensors:
        if torch.isfinite(p).all() and not torch.isfinite(p.detach().to(dtype)).all():
            raise OverflowError(
                f"a parameter of shape {tuple(p.shape)} holds a value beyond snapshot_dtype={dtype}'s range "
                f"(largest |w| {float(p.detach().abs().max()):.4g}); use snapshot_dtype=torch.float32")
    raise ValueError("a tracked parameter holds a non-finite value")


class SnapshotFile(ColumnSource):
    """Snapshots stored row after row in a file: a (rows, N) trajectory read a chunk of columns at a time.

    Reads go through ``os.pread`` into fresh buffers (no memory map), so what the reader holds is the chunk
    it asked for; the page cache may keep the file's pages, but they are not the process's memory.
    """

    chunk_elements = 1 << 22

    def __init__(self, path: Path, numel: int, dtype: torch.dtype, rows: int, owned: bool) -> None:
        self.path, self.numel, self.dtype, self.rows, self.owned = Path(path), numel, dtype, rows, owned
        self._fd = os.open(self.path, os.O_RDWR if owned else os.O_RDONLY)
        # closed (and, if this object made the file, deleted) when it is collected or the process exits
        self._finalizer = weakref.finalize(self, _close, self._fd, self.path if owned else None)

    @classmethod
    def create(cls, directory, numel: int, dtype: torch.dtype) -> SnapshotFile:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"snapshot_dir={str(directory)!r} is not a folder")
        handle, name = tempfile.mkstemp(prefix="cmd-snapshots-", suffix=".bin", dir=directory)
        os.close(handle)
        return cls(Path(name), numel, dtype, 0, owned=True)

    @classmethod
    def open(cls, path, numel: int, dtype: torch.dtype, rows: int) -> SnapshotFile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"the snapshot file {path} named by the state_dict does not exist")
        needed = rows * numel * dtype.itemsize
        if path.stat().st_size < needed:
            raise ValueError(f"the snapshot file {path} holds {path.stat().st_size} bytes, the state_dict names "
                             f"{rows} snapshots of {numel} values ({needed} bytes)")
        return cls(path, numel, dtype, rows, owned=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.numel))

    @property
    def ndim(self) -> int:
        return 2

    def write(self, row: int, start: int, values: torch.Tensor) -> None:
        data = values.contiguous().view(torch.uint8).numpy()
        written = os.pwrite(self._fd, data, (row * self.numel + start) * self.dtype.itemsize)
        if written != data.nbytes:
            raise OSError(f"short write to {self.path} ({written} of {data.nbytes} bytes): is the disk full?")

    def _read(self, row: int, start: int, stop: int) -> torch.Tensor:
        size = (stop - start) * self.dtype.itemsize
        data = os.pread(self._fd, size, (row * self.numel + start) * self.dtype.itemsize)
        if len(data) != size:
            raise OSError(f"short read from {self.path}: the file ends before snapshot {row}")
        return torch.frombuffer(bytearray(data), dtype=self.dtype)

    def row(self, index: int) -> torch.Tensor:
        return self._read(index, 0, self.numel)

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("a snapshot file reads whole columns: use trajectory[:, columns]")
        if isinstance(cols, slice):
            start, stop, _ = cols.indices(self.numel)
            return torch.stack([self._read(r, start, stop) for r in range(self.rows)])
        index = torch.as_tensor(cols).cpu()
        low, high = int(index.min()), int(index.max()) + 1
        if high - low <= 4 * len(index) + 1024:  # close together: one range per row, then pick
            return self[:, slice(low, high)][:, index - low]
        return torch.stack([torch.cat([self._read(r, int(i), int(i) + 1) for i in index]) for r in range(self.rows)])

    def keep(self, rows: int) -> Path:
        """A second, lasting name for this file (a hard link, or a copy where links are not possible), for
        a checkpoint that holds its first ``rows`` snapshots: those rows never change, the file may go on
        growing, and the name outlives this object and the switch. Such files are left for the user to
        delete with the run."""
        kept = self.path.with_name(f"{self.path.stem}-rows{rows}.bin")
        if not kept.exists():
            try:
                os.link(self.path, kept)
            except OSError:
                with open(kept, "wb") as out:
                    for row in range(rows):
                        out.write(self.row(row).view(torch.uint8).numpy().tobytes())
        return kept

    def delete(self) -> None:
        self._finalizer()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "numel": self.numel, "dtype": self.dtype, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        """A copy (pickle, deepcopy) gets a file of its own beside the original, with the same rows."""
        source = SnapshotFile.open(state["path"], state["numel"], state["dtype"], state["rows"])
        copy = SnapshotFile.create(source.path.parent, state["numel"], state["dtype"])
        for row in range(state["rows"]):
            copy.write(row, 0, source.row(row))
        source.delete()
        self.__init__(copy.path, copy.numel, copy.dtype, state["rows"], owned=True)
        copy._finalizer.detach()  # this object owns the file now
        os.close(copy._fd)


def _close(fd: int, owned_path: Path | None) -> None:
    os.close(fd)
    if owned_path is not None:
        owned_path.unlink(missing_ok=True)
