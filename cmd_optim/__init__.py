"""cmd-optim: Correlation Mode Decomposition (CMD) of neural-network training.

Layers (each imports only those to its left): ``core`` (the math) <- ``optim`` (the optimizer) <-
``integrations`` (Hugging Face, DDP); ``core`` <- ``analysis`` (checkpoints, reports, Koopman, CLI).
"""

from .core import ColumnSource, Decomposition, OnlineCMD, decompose
from .optim import CMDOptimizer, Gradual, LowRank, Modes, SwitchNotice

__all__ = [
    "CMDOptimizer",
    "ColumnSource",
    "Decomposition",
    "Gradual",
    "LowRank",
    "Modes",
    "OnlineCMD",
    "SwitchNotice",
    "__version__",
    "decompose",
]
__version__ = "0.2.0.dev0"
