"""Looking at training runs with CMD (imports ``core`` only): checkpoints read as a streamed trajectory,
:func:`analyze` with its report and plots, and :mod:`cmd_optim.analysis.koopman` (the ``analysis``
extra) for comparing runs through their Koopman eigenvalues."""

from .checkpoints import CheckpointTrajectory, find_checkpoints
from .online import online_cmd_from_checkpoints
from .report import Report, analyze, pca_explained_variance

__all__ = ["CheckpointTrajectory", "Report", "analyze", "find_checkpoints", "online_cmd_from_checkpoints",
           "pca_explained_variance"]
