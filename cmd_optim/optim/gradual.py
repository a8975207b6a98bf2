"""The gradual reduction, the paper's embedded CMD: the base optimizer keeps training while parameters are
tied to their modes a share at a time (:class:`~cmd_optim.optim.embedding.GradualEmbedding`).

An embedded element leaves the base optimizer: the base steps, per tracked tensor, a packed 1-D parameter of
the tensor's live (not yet embedded) elements, gathered from the tensor before each step and written back
after it; at each embedding round the packed parameters shrink and the base's per-element state keeps the
entries of the elements still live. For a base whose update of an element reads only that element's
gradient and state (:data:`ELEMENTWISE`: SGD, Adam, AdamW, RMSprop, Adagrad, ...) this computes exactly what
stepping every element and putting the embedded ones back on their line computes (the paper's method), with
the embedded elements' state gone. An embedded element's gradient is not used at all (the references step on
their own gradient, as in the paper), so a DDP hook need not send it: with
``cmd_optim.integrations.ddp.register_cmd_hook`` the bytes per step are the live elements' gradients
and the free parameters', falling with every round.

Other bases (LAMB-like per-tensor norms, Adafactor's factored moments, a custom optimizer) would compute
something else on a packed vector; for them (``pack=None``, the default) the phase steps the whole tensors as
before, embedded elements included, and keeps their state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..core import Decomposition
from ..core._checks import check_int, check_real
from ._params import all_finite, hyperparameters, tensor_bytes
from .decomposed import Decomposed
from .embedding import GradualEmbedding, gather
from .phase import Setup, guarded_step
from .reduction import register
from .warmup import WarmupPhase, load_base_state

__all__ = ["ELEMENTWISE", "Gradual", "GradualPhase"]

#: torch.optim bases whose update of an element reads only that element's gradient and state: the gradual
#: phase packs the live elements for them (``Gradual(pack=None)``).
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad", "Adadelta", "ASGD")


@register
@dataclasses.dataclass(frozen=True)
class Gradual(Decomposed):
    """``CMDOptimizer(..., reduction=Gradual(every=2, fraction=0.1))``.

    Args (besides the decomposition's, see :class:`~cmd_optim.optim.decomposed.Decomposed`):
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded parameters that each round embeds (P), in (0, 1].
        pack: step only the live elements, packed (True), or the whole tensors (False); None: packed for the
            bases of :data:`ELEMENTWISE`, where packing computes the same weights, whole tensors for others.
    """

    every: int = 2
    fraction: float = 0.1
    pack: bool | None = None

    name: ClassVar[str] = "gradual"
    communication_hook: ClassVar[bool] = True
    state_keys: ClassVar[tuple[str, ...]] = ("decomposition", "embedding")
    state_settings: ClassVar[tuple[str, ...]] = (*Decomposed.state_settings, "pack")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("every", check_int("every", self.every, low=1))
        self._set("fraction", check_real("fraction", self.fraction, low=0, high=1, low_open=True))
        if self.pack is not None and not isinstance(self.pack, bool):
            raise TypeError(f"pack must be True, False or None, got {self.pack!r}")

    def packs(self, setup: Setup) -> bool:
        """Whether the phase packs the live elements with this base."""
        return setup.make_base.optimizer_name in ELEMENTWISE if self.pack is None else self.pack

    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> GradualPhase:
        d = self.fit(setup, warmup.recorder, steps_taken, keep=True)
        embedding = GradualEmbedding(d, setup.params.tracked, self.every, self.fraction)
        return GradualPhase(setup, embedding, self.packs(setup), self.snapshot_every, self.report(d, setup),
                            base_state=warmup.optimizer.state)

    def load(self, setup: Setup, envelope: dict, extra: dict) -> GradualPhase:
        """The gradual phase from saved state, built beside the live one (every entry checked first)."""
        if not isinstance(extra.get("decomposition"), dict) or not isinstance(extra.get("embedding"), dict):
            raise ValueError("the gradual-phase state_dict needs 'decomposition' and 'embedding'")
        d = Decomposition.from_state_dict(extra["decomposition"])
        embedding = GradualEmbedding(d, setup.params.tracked, self.every, self.fraction, state=extra["embedding"])
        phase = GradualPhase(setup, embedding, self.packs(setup), self.snapshot_every, extra.get("fit", {}))
        load_base_state(phase.optimizer, envelope)
        return phase


def _per_element(key: str, value, param: torch.Tensor) -> bool:
    """Whether a base-state entry holds one number per element of ``param`` (``exp_avg``), not a count (``step``)."""
    return (isinstance(value, torch.Tensor) and value.shape == param.shape and value.numel() == param.numel()
            and not (param.ndim == 0 and key == "step"))


def _placeholder(count: int, like: torch.Tensor) -> torch.Tensor:
    """``count`` zeros that take no memory: a packed parameter's value between two steps."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(count)


class GradualPhase:
    """The reduced phase of :class:`Gradual`.

    Packed (``packed``; see the module's text): per tracked tensor a 1-D ``nn.Parameter`` in ``packs``, the base
    optimizer's parameter, holding the tensor's live elements (``embedding.positions``) during a step and no
    memory between steps; the tensors' ``.grad`` are left as they were. Whole tensors (``packed`` False): the
    base steps the tracked tensors themselves. Either way the embedded elements are then put back on their line.
    Its public attributes: ``embedding``, ``packed``, ``packs``.
    """

    name = "gradual"
    reduced = True

    def __init__(self, setup: Setup, embedding: GradualEmbedding, packed: bool, snapshot_every: int,
                 fit_report: dict, base_state=None) -> None:
        self.setup, self.embedding, self.packed = setup, embedding, packed
        self.snapshot_every, self.fit_report = snapshot_every, dict(fit_report)
        tracked = setup.params.tracked
        self.packs = [nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device)) for p in tracked] if packed else []
        for q, count in zip(self.packs, embedding.live_counts):
            q.data = _placeholder(count, q)
        self._index = {p: j for j, p in enumerate(tracked)}
        stand_in = {p: q for p, q in zip(tracked, self.packs)}
        groups = [{**hyperparameters(visible), "params": [stand_in.get(p, p) for p in visible["params"]]}
                  for visible in setup.params.groups]
        self.optimizer = setup.make_base(groups)
        if base_state is not None:  # at the switch: the warm-up's state, the live elements' part of it
            for p, entry in base_state.items():
                if p in stand_in:
                    pos = embedding.positions[self._index[p]]
                    entry = {key: gather(value, pos).clone() if _per_element(key, value, p) else value
                             for key, value in entry.items()}
                self.optimizer.state[stand_in.get(p, p)] = entry

    @property
    def decomposition(self) -> Decomposition:
        """The online fit of the live elements (``embedding.decomposition``)."""
        return self.embedding.decomposition

    def adopt(self) -> None:
        if self.packed:
            self.setup.exchange.attach_packing(self)

    def release(self) -> None:
        if self.packed:
            self.setup.exchange.attach_packing(None)

    def positions_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """For a communication hook: the flat positions of ``param``'s live elements (the only ones whose gradient
        the phase reads), or None for a parameter whose whole gradient it reads (a free one)."""
        index = self._index.get(param)
        return None if index is None else self.embedding.positions[index]

    # ------------------------------------------------------------------ stepping
    def step(self, loss, closure: Callable | None) -> bool:
        self.setup.exchange.check_exchanged()
        for inner, visible in zip(self.optimizer.param_groups, self.setup.params.groups):
            inner.update(hyperparameters(visible))
        tracked = self.setup.params.tracked
        if self.packed:
            for p, q, pos in zip(tracked, self.packs, self.embedding.positions):
                if p.grad is not None:
                    q.data = gather(p.detach(), pos).clone()
                    q.grad = gather(p.grad.detach(), pos).clone()
        stepped = [q for group in self.optimizer.param_groups for q in group["params"]]
        try:
            took = all_finite(q.grad for q in stepped) and guarded_step(self.optimizer, loss, closure, stepped)
            if took and self.packed:
                with torch.no_grad():
                    for p, q, pos in zip(tracked, self.packs, self.embedding.positions):
                        if q.grad is not None:
                            _scatter(p, pos, q.detach())
        finally:
            for q in self.packs:
                q.data, q.grad = _placeholder(q.numel(), q), None
        if took:
            self.embedding.follow([p for p in tracked if p.grad is not None])
        return took

    def after_step(self, steps_taken: int) -> None:
        if steps_taken % self.snapshot_every:
            return
        kept = self.embedding.observe([p for p in self.setup.params.tracked if p.grad is not None])
        if kept is not None and self.packed:
            self._repack(kept)

    def _repack(self, kept: list[torch.Tensor]) -> None:
        """After a round: each packed parameter shrinks to the elements still live, and so does its state."""
        for q, keep in zip(self.packs, kept):
            entry = self.optimizer.state.get(q)
            if entry:
                self.optimizer.state[q] = {key: value[keep] if _per_element(key, value, q) else value
                                           for key, value in entry.items()}
            q.data = _placeholder(int(keep.sum()), q)

    # ------------------------------------------------------------------ accounting and state
    def trainable_dims(self) -> int:
        free = sum(p.numel() for p in self.setup.params.free if p.requires_grad)
        return free + self.embedding.num_live

    def state_bytes(self) -> int:
        """The base optimizer's state (of the live elements when packed) and the embedding's, the live elements'
        decomposition included."""
        return tensor_bytes(self.optimizer.state) + self.embedding.nbytes()

    def extra_state(self) -> dict:
        return {"decomposition": self.decomposition.state_dict(), "embedding": self.embedding.state_dict(),
                "fit": dict(self.fit_report)}

    def report(self) -> dict:
        return {**self.fit_report, "embedded": self.embedding.num_embedded, "packed": self.packed}


def _scatter(param: torch.Tensor, positions: torch.Tensor | None, values: torch.Tensor) -> None:
    """``param.reshape(-1)[positions] = values`` (None: every element), in place (through a copy for a
    non-contiguous tensor)."""
    if positions is None:
        param.detach().copy_(values.view_as(param))
    elif param.is_contiguous():
        param.detach().view(-1).index_copy_(0, positions.long(), values)
    else:
        flat = param.detach().reshape(-1).clone()
        flat.index_copy_(0, positions.long(), values)
        param.detach().copy_(flat.view_as(param))
