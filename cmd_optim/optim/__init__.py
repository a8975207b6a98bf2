"""Training with CMD: the optimizer, its phases and its reductions (imports ``core`` only).

Each reduction registers itself (``reduction.register``) when its module is imported here.
"""

from .cmd import CMDOptimizer, SwitchNotice, find_cmd_optimizer, optimizer_state_bytes
from .exchange import ModeExchange
from .gradual import Gradual
from .lowrank import LowRank
from .modes import Modes
from .reduction import REDUCTIONS, Reduction, register

__all__ = ["REDUCTIONS", "CMDOptimizer", "Gradual", "LowRank", "ModeExchange", "Modes", "Reduction",
           "SwitchNotice", "find_cmd_optimizer", "optimizer_state_bytes", "register"]
