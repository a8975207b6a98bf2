"""Online CMD built after the fact from a run's checkpoints (the same model ``OnlineCMD`` fits during it)."""

from __future__ import annotations

import math

from torch import nn

from ..core import OnlineCMD, decompose
from .checkpoints import CheckpointTrajectory, _Weights, find_checkpoints

__all__ = ["online_cmd_from_checkpoints"]


def online_cmd_from_checkpoints(model: nn.Module, run_dir, warmup_snapshots: int = 20, **kwargs) -> OnlineCMD:
    """The :class:`~cmd_optim.OnlineCMD` model of the run in ``run_dir``, its checkpoints taken as snapshots.

    The first ``warmup_snapshots`` checkpoints are decomposed streamed by columns (never held whole); each
    later one refits the model online, read one checkpoint at a time. ``model`` gives the architecture
    (its weights are not used); the held copy ends with the last checkpoint's buffers and non-modelled
    parameters. ``kwargs`` go to OnlineCMD (``modes``, ``samples``, ``seed``, ``params``, ``device``).
    """
    paths = find_checkpoints(run_dir)
    cmd = OnlineCMD(model, warmup_snapshots=warmup_snapshots, **kwargs)
    if len(paths) < warmup_snapshots:
        raise ValueError(f"{run_dir} has {len(paths)} checkpoints, fewer than warmup_snapshots={warmup_snapshots}")
    trajectory = CheckpointTrajectory(paths, names=cmd.names)
    warmup = CheckpointTrajectory(paths[:warmup_snapshots], names=cmd.names)
    d = decompose(warmup, modes=cmd.modes, samples=cmd.samples, seed=cmd.seed, layer_sizes=warmup.sizes)
    cmd.start_from(d, trajectory.row(warmup_snapshots - 1))
    for index in range(warmup_snapshots, len(paths)):
        cmd.observe(trajectory.row(index))
    last = _Weights(paths[-1])
    rest = {name: last.read(name, 0, math.prod(shape)).view(shape) for name, shape in last.shapes.items()
            if name not in cmd.names}
    cmd.module.load_state_dict(rest, strict=False)
    return cmd
