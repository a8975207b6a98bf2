"""cmd-optim: Correlation Mode Decomposition (CMD) of neural-network training."""
from .decomposition import Decomposition, decompose
from .optimizer import CMDOptimizer, optimizer_state_bytes

__all__ = ["CMDOptimizer", "Decomposition", "decompose", "optimizer_state_bytes"]
__version__ = "0.1.0.dev0"
