"""The gradual reduction, the paper's embedded CMD: the base optimizer keeps training while parameters are
tied to their modes a share at a time (:class:`~cmd_optim.optim.embedding.GradualEmbedding`).

It saves trainable numbers (what a federated client would send), not memory or time: the base optimizer
keeps its full state, and the embedding adds the Decomposition's running statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from ..core import Decomposition
from ..core._checks import check_int, check_real
from ._params import all_finite, tensor_bytes
from .decomposed import Decomposed
from .embedding import GradualEmbedding
from .phase import Setup, guarded_step
from .reduction import register
from .warmup import WarmupPhase, load_base_state

__all__ = ["Gradual", "GradualPhase"]


@register
@dataclasses.dataclass(frozen=True)
class Gradual(Decomposed):
    """``CMDOptimizer(..., reduction=Gradual(every=2, fraction=0.1))``.

    Args (besides the decomposition's, see :class:`~cmd_optim.optim.decomposed.Decomposed`):
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded parameters that each round embeds (P), in (0, 1].
    """

    every: int = 2
    fraction: float = 0.1

    name: ClassVar[str] = "gradual"
    state_keys: ClassVar[tuple[str, ...]] = ("decomposition", "embedding")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("every", check_int("every", self.every, low=1))
        self._set("fraction", check_real("fraction", self.fraction, low=0, high=1, low_open=True))

    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> GradualPhase:
        d = self.fit(setup, warmup.recorder, steps_taken, keep=True)
        embedding = GradualEmbedding(d, setup.params.tracked, self.every, self.fraction)
        return GradualPhase(setup, warmup.optimizer, embedding, self.snapshot_every, self.report(d, setup))

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
        return GradualPhase(setup, optimizer, embedding, self.snapshot_every, extra.get("fit", {}))


class GradualPhase:
    """The base optimizer steps every parameter; embedded ones are put back on their mode after each step."""

    name = "gradual"
    reduced = True

    def __init__(self, setup: Setup, optimizer: torch.optim.Optimizer, embedding: GradualEmbedding,
                 snapshot_every: int, fit_report: dict) -> None:
        self.setup, self.optimizer, self.embedding = setup, optimizer, embedding
        self.snapshot_every, self.fit_report = snapshot_every, dict(fit_report)

    @property
    def decomposition(self) -> Decomposition:
        return self.embedding.decomposition

    def adopt(self) -> None:
        self.setup.adopt_groups(self.optimizer)

    def release(self) -> None:
        pass

    def step(self, loss, closure: Callable | None) -> bool:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not all_finite(p.grad for p in params):
            return False
        if not guarded_step(self.optimizer, loss, closure, params):
            return False
        self.embedding.follow([p for p in self.setup.params.tracked if p.grad is not None])
        return True

    def after_step(self, steps_taken: int) -> None:
        if steps_taken % self.snapshot_every == 0:
            self.embedding.observe([p for p in self.setup.params.tracked if p.grad is not None])

    def trainable_dims(self) -> int:
        free = sum(p.numel() for p in self.setup.params.free if p.requires_grad)
        return free + self.embedding.decomposition.num_params - self.embedding.num_embedded

    def state_bytes(self) -> int:
        return (tensor_bytes(self.optimizer.state) + tensor_bytes(self.decomposition.state_dict())
                + tensor_bytes(self.embedding.state_dict()))

    def extra_state(self) -> dict:
        return {"decomposition": self.decomposition.state_dict(), "embedding": self.embedding.state_dict(),
                "fit": dict(self.fit_report)}

    def report(self) -> dict:
        return {**self.fit_report, "embedded": self.embedding.num_embedded}
