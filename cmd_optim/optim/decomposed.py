"""What the two CMD reductions (modes, gradual) share: their decomposition settings, the warm-up's snapshots,
and the fit at the switch."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch

from ..core import Decomposition, SlopeFit, SnapshotBuffer, decompose, fit_slopes
from ..core._checks import check_device, check_dtype, check_int
from ..core.snapshots import open_saved
from ._dist_checks import check_rank_consistency
from .phase import Setup
from .reduction import Reduction
from .warmup import WarmupRecorder

__all__ = ["Decomposed", "SnapshotRecorder"]


@dataclasses.dataclass(frozen=True)
class Decomposed(Reduction):
    """Settings of a reduction that decomposes the warm-up's trajectory with CMD.

    Args:
        modes: the most CMD modes (M, at most 256); the decomposition may find fewer.
        samples: how many parameter trajectories the clustering sees (K, at least ``modes``).
        seed: seeds the sampling of the decomposition.
        snapshot_every: a snapshot of the tracked parameters every this many warm-up steps (and at step 0).
        snapshot_device, snapshot_dtype: where and how the snapshots are kept: ``(switch_after //
            snapshot_every + 1) * N * itemsize`` bytes, freed at the switch.
        snapshot_dir: an existing folder: the snapshots go to a file there instead of memory (read back a chunk
            of columns at a time at the switch); a warm-up state_dict then names that file.
    """

    modes: int = 10
    samples: int = 1000
    seed: int = 0
    snapshot_every: int = 10
    snapshot_device: torch.device | str = "cpu"
    snapshot_dtype: torch.dtype = torch.float32
    snapshot_dir: str | None = None

    needs_snapshots: ClassVar[bool] = True
    state_settings: ClassVar[tuple[str, ...]] = ("snapshot_every",)
    shortcuts: ClassVar[tuple[str, ...]] = ("modes", "samples", "seed", "snapshot_every", "snapshot_device",
                                            "snapshot_dtype", "snapshot_dir")

    def __post_init__(self) -> None:
        self._set("modes", check_int("modes", self.modes, low=1, high=256))
        self._set("samples", check_int("samples", self.samples, low=1))
        if self.samples < self.modes:
            raise ValueError(f"samples must be >= modes ({self.modes}), got {self.samples}")
        self._set("seed", check_int("seed", self.seed, low=0, high=2**63 - 1))
        self._set("snapshot_every", check_int("snapshot_every", self.snapshot_every, low=1))
        device = check_device("snapshot_device", self.snapshot_device)
        check_dtype("snapshot_dtype", self.snapshot_dtype)
        if self.snapshot_dir is not None:
            if device.type != "cpu":
                raise ValueError(f"snapshot_dir keeps the snapshots in a file; snapshot_device="
                                 f"{self.snapshot_device!r} cannot apply (leave it at 'cpu')")
            if not os.path.isdir(self.snapshot_dir):
                raise ValueError(f"snapshot_dir={self.snapshot_dir!r} is not an existing folder")

    def num_snapshots(self, switch_after: int) -> int:
        """Snapshots of the warm-up: at step 0 and every ``snapshot_every`` steps up to the switch."""
        return switch_after // self.snapshot_every + 1

    def check(self, setup: Setup) -> None:
        count = self.num_snapshots(setup.switch_after)
        if count < 3:
            raise ValueError(f"warm-up too short: switch_after={setup.switch_after} with snapshot_every="
                             f"{self.snapshot_every} gives {count} snapshots, CMD needs at least 3")

    def warmup_recorder(self, setup: Setup, saved: dict | None = None) -> SnapshotRecorder:
        return SnapshotRecorder(setup, self, saved)

    def fit(self, setup: Setup, recorder: SnapshotRecorder, steps_taken: int,
            keep: bool) -> tuple[SlopeFit | Decomposition, torch.Tensor]:
        """The decomposition of the warm-up's snapshots (a full :class:`Decomposition` with ``keep``, else the
        5-byte-per-parameter :class:`SlopeFit`), and the references' global indices (M,) (under FSDP2 a full
        Decomposition is of this rank's columns, and its ``references`` are among them). Raises if the warm-up
        moved nothing."""
        trajectory = recorder.buffer.trajectory()
        if setup.sharding is not None and keep:
            d, references = setup.sharding.decompose(trajectory, self.modes, self.samples, self.seed)
        elif setup.sharding is not None:
            d = setup.sharding.fit_slopes(trajectory, self.modes, self.samples, self.seed, measure=True)
            references = d.references
        else:
            fit = decompose if keep else fit_slopes
            d = fit(trajectory, modes=self.modes, samples=self.samples, seed=self.seed,
                    layer_sizes=recorder.buffer.layout.sizes, measure=True)
            references = d.references
        if not bool((d.profiles.amax(dim=1) > d.profiles.amin(dim=1)).any()):
            raise RuntimeError(
                f"the warm-up moved none of the sampled parameters in {steps_taken} steps (a learning rate of 0, "
                "zero gradients, or step() without a backward?): there are no modes to train. The optimizer stays "
                "in the warm-up and retries at the next step.")
        replicas = setup.replica_group()  # (None when sharded: the ranks agree by construction, shared samples)
        if replicas is not None:
            check_rank_consistency(d, replicas)
        return d, references

    @staticmethod
    def report(d: SlopeFit | Decomposition, setup: Setup) -> dict:
        """The decomposition's entries of ``switch_report``."""
        total = d.num_params if setup.sharding is None else setup.sharding.num_global
        return {"modes": d.num_modes, "decomposed_params": total, "snapshots": d.num_snapshots,
                "relative_error": float(d.fit_quality.relative_error.mean()),
                "explained_variance": d.fit_quality.explained_variance}


class SnapshotRecorder(WarmupRecorder):
    """The warm-up's snapshots of the tracked parameters (of this rank's shards), at step 0 and every
    ``snapshot_every`` steps up to the switch, in a :class:`SnapshotBuffer`."""

    def __init__(self, setup: Setup, settings: Decomposed, saved: dict | None = None) -> None:
        self.setup, self.every = setup, settings.snapshot_every
        self.expected = settings.num_snapshots(setup.switch_after)
        self.buffer = SnapshotBuffer(setup.local_tracked(), self.expected, check_device("snapshot_device",
                                     settings.snapshot_device), settings.snapshot_dtype, settings.snapshot_dir)
        try:
            if saved is None:
                self.buffer.record(setup.local_tracked())
            else:
                self._load(saved)
        except Exception:
            self.buffer.release()
            raise

    def records_at(self, steps_taken: int) -> bool:
        return steps_taken % self.every == 0 and steps_taken <= self.setup.switch_after

    def after_step(self, steps_taken: int) -> None:
        if self.records_at(steps_taken):
            self.buffer.record(self.setup.local_tracked())

    def state(self) -> dict:
        """The snapshots so far (under FSDP2: one DTensor per parameter, (snapshots, *shape), this rank's rows)."""
        saved = self.buffer.saved()
        sharding = self.setup.sharding
        if sharding is not None and isinstance(saved, torch.Tensor):
            shapes = [t.shape for t in self.setup.local_tracked()]
            pieces = saved.split([s.numel() for s in shapes], dim=1)
            saved = [sharding.global_view(piece.reshape(len(saved), *shape), index, dim=1)
                     for index, (piece, shape) in enumerate(zip(pieces, shapes))]
        return {"snapshots": saved}

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def release(self) -> None:
        self.buffer.release()

    def _load(self, saved: dict) -> None:
        if "snapshots" not in saved:
            raise ValueError("the warm-up state_dict has no 'snapshots' (it was saved with a reduction that "
                             "needs none)")
        snapshots, steps_taken = saved["snapshots"], saved["steps_taken"]
        if isinstance(snapshots, list):  # saved under FSDP2: this rank's rows of every parameter's trajectory
            snapshots = torch.cat([self.setup.local(t).reshape(t.shape[0], -1) for t in snapshots], dim=1)
        snapshots = open_saved(snapshots)
        expected = min(steps_taken, self.setup.switch_after) // self.every + 1
        if len(snapshots.shape) != 2 or snapshots.shape[0] != expected:
            raise ValueError(f"the warm-up state_dict holds {snapshots.shape[0]} snapshots after {steps_taken} "
                             f"steps; with snapshot_every={self.every} this optimizer expects {expected}")
        self.buffer.load(snapshots)
