"""Training with CMD: the optimizer, its phases and its reduction strategies (imports ``core`` only)."""

from .cmd import CMDOptimizer, find_cmd_optimizer, optimizer_state_bytes
from .exchange import ModeExchange
from .gradual import Gradual
from .lowrank import LowRank
from .modes import Modes

__all__ = ["CMDOptimizer", "Gradual", "LowRank", "ModeExchange", "Modes", "find_cmd_optimizer",
           "optimizer_state_bytes"]
