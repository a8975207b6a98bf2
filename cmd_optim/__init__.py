"""cmd-optim: Correlation Mode Decomposition (CMD) of neural-network training."""
from .decomposition import Decomposition, decompose

__all__ = ["Decomposition", "decompose"]
__version__ = "0.1.0.dev0"
