"""The gradual reduction, the paper's embedded CMD: the base optimizer keeps training while parameters are
tied to their modes a share at a time (:class:`~cmd_optim.optim.embedding.GradualEmbedding`).

It saves trainable numbers (what a federated client would send), not memory or time: the base optimizer
keeps its full state, and the embedding adds the Decomposition's running statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import Decomposition
from ..core._checks import check_int, check_real
from ._params import all_finite, tensor_bytes
from .embedding import GradualEmbedding
from .phase import Setup, guarded_step
from .warmup import WarmupPhase, load_base_state

__all__ = ["Gradual", "GradualPhase"]


class Gradual:
    """``CMDOptimizer(..., reduction=Gradual(every=2, fraction=0.1))``.

    Args:
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded parameters that each round embeds (P), in (0, 1].
    """

    name = "gradual"
    needs_snapshots = True
    row_window = 0  # no embedding row marks needed

    def check(self, setup: Setup) -> None:
        if setup.sharding is not None:
            raise ValueError("reduction=Gradual is not available with FSDP2-sharded parameters: use reduction='modes'")

    def __init__(self, every: int = 2, fraction: float = 0.1) -> None:
        self.every = check_int("every", every, low=1)
        self.fraction = check_real("fraction", fraction, low=0, high=1, low_open=True)

    def __repr__(self) -> str:
        return f"Gradual(every={self.every}, fraction={self.fraction})"

    def build(self, setup: Setup, warmup: WarmupPhase, d: Decomposition) -> GradualPhase:
        embedding = GradualEmbedding(d, setup.params.tracked, self.every, self.fraction)
        return GradualPhase(setup, warmup.optimizer, embedding)

    def load(self, setup: Setup, envelope: dict, extra: dict) -> GradualPhase:
        if "decomposition" not in extra or "embedding" not in extra:
            raise ValueError("the gradual-phase state_dict needs 'decomposition' and 'embedding'")
        d = Decomposition.from_state_dict(extra["decomposition"])
        if d.num_params != sum(p.numel() for p in setup.params.tracked):
            raise ValueError(f"the gradual-phase state_dict decomposes {d.num_params} parameters, this optimizer "
                             f"tracks {sum(p.numel() for p in setup.params.tracked)}")
        embedding = GradualEmbedding(d, setup.params.tracked, self.every, self.fraction)
        embedding.load_state_dict(extra["embedding"])
        optimizer = setup.base_on_copies()
        load_base_state(optimizer, envelope)
        return GradualPhase(setup, optimizer, embedding)


class GradualPhase:
    """The base optimizer steps every parameter; embedded ones are put back on their mode after each step."""

    name = "gradual"
    reduced = True

    def __init__(self, setup: Setup, optimizer: torch.optim.Optimizer, embedding: GradualEmbedding) -> None:
        self.setup, self.optimizer, self.embedding = setup, optimizer, embedding

    @property
    def decomposition(self) -> Decomposition:
        return self.embedding.decomposition

    def adopt(self) -> None:
        self.setup.adopt_groups(self.optimizer)

    def step(self, loss, closure: Callable | None) -> bool:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not all_finite(p.grad for p in params):
            return False
        if not guarded_step(self.optimizer, loss, closure, params):
            return False
        self.embedding.follow([p for p in self.setup.params.tracked if p.grad is not None])
        return True

    def after_step(self, steps_taken: int) -> None:
        if steps_taken % self.setup.snapshot_every == 0:
            self.embedding.observe([p for p in self.setup.params.tracked if p.grad is not None])

    def trainable_dims(self) -> int:
        free = sum(p.numel() for p in self.setup.params.free if p.requires_grad)
        return free + self.embedding.decomposition.num_params - self.embedding.num_embedded

    def state_bytes(self) -> int:
        return (tensor_bytes(self.optimizer.state) + tensor_bytes(self.decomposition.state_dict())
                + tensor_bytes(self.embedding.state_dict()))

    def extra_state(self) -> dict:
        return {"decomposition": self.decomposition.state_dict(), "embedding": self.embedding.state_dict()}
