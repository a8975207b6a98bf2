"""The gradual reduction, the paper's embedded CMD: the base optimizer keeps training while parameters are
tied to their modes a share at a time (:class:`~cmd_optim.optim.embedding.GradualEmbedding`).

An embedded element leaves the base optimizer: the base steps, per tracked tensor, a packed 1-D parameter of
the tensor's live (not yet embedded) elements, gathered from the tensor before each step and written back
after it; at each embedding round the packed parameters shrink and the base's per-element state keeps the
entries of the elements still live. For a base whose update of an element reads only that element's
gradient and state (:data:`ELEMENTWISE`: SGD, Adam, AdamW, RMSprop, Adagrad, ...) this computes exactly what
stepping every element and putting the embedded ones back on their line computes (the paper's method), with
the embedded elements' state gone. By default (``embedded_gradient="dropped"``) an embedded element's gradient
is not used at all (the references step on their own gradient, as in the paper), so a DDP hook need not send
it: with ``cmd_optim.integrations.ddp.register_cmd_hook`` the bytes per step are the live elements' gradients
and the free parameters', falling with every round.

``embedded_gradient="pooled"``: an embedded element ``i`` of mode ``k`` is tied, ``theta_i = a_i theta_ref(k) +
b_i``, so the chain rule gives the reference ``g_ref + sum_i a_i g_i``. That raw sum grows with the mode's
members (on the digits MLP it reaches 10^4 x ``g_ref``) and would take an SGD step far out of scale; the
reference steps instead on ``h_k = (g_ref + sum_i a_i g_i) / (1 + sum_i a_i^2)``, the least-squares fit of one
number to the mode's gradients along the tie (it equals ``g_ref`` when the members' gradients lie on the line
``g_i = a_i g_ref``). Measured on the ddp-curve benchmark (3 seeds), the raw sum lost 0.003 (digits) and 0.013
(MNIST-1D) of accuracy against the paper's method, the pooled form 0.000 and 0.005 (docs/distributed.md). The M
sums are linear in the gradient: per step one ``index_add`` per tensor holding embedded elements; under DDP each
bucket sends its M sums with its live elements; under FSDP2 one all-reduce of this rank's M sums (and one of
the M ``sum a^2`` after each round).

Other bases (LAMB-like per-tensor norms, Adafactor's factored moments, a custom optimizer) would compute
something else on a packed vector; for them (``pack=None``, the default) the phase steps the whole tensors as
before, embedded elements included, and keeps their state.

Under FSDP2 each rank packs the live elements of its own rows and keeps their state only; the references'
values come from one all-reduce of M numbers per step, and each round ranks the drifts of all ranks with a few
small collectives (:mod:`cmd_optim.optim.embedding`), so every rank embeds what one process would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..core import Decomposition
from ..core._checks import check_int, check_real
from ._params import hyperparameters, tensor_bytes
from .decomposed import Decomposed
from .embedding import GradualEmbedding, gather, local_state, sharded_state
from .phase import Setup, guarded_step
from .reduction import register
from .sharding import is_sharded
from .warmup import WarmupPhase, load_base_state

__all__ = ["ELEMENTWISE", "EMBEDDED_GRADIENTS", "Gradual", "GradualPhase"]

#: torch.optim bases whose update of an element reads only that element's gradient and state: the gradual
#: phase packs the live elements for them (``Gradual(pack=None)``).
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad", "Adadelta", "ASGD")
#: the values of ``Gradual(embedded_gradient=...)``
EMBEDDED_GRADIENTS = ("dropped", "pooled")


@register
@dataclasses.dataclass(frozen=True)
class Gradual(Decomposed):
    """``CMDOptimizer(..., reduction=Gradual(every=2, fraction=0.1))``.

    Args (besides the decomposition's, see :class:`~cmd_optim.optim.decomposed.Decomposed`):
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded parameters that each round embeds (P), in (0, 1].
        pack: step only the live elements, packed (True), or the whole tensors (False); None: packed for the
            bases of :data:`ELEMENTWISE`, where packing computes the same weights, whole tensors for others.
        embedded_gradient: what becomes of an embedded element's gradient. "dropped" (the paper's method): nothing,
            each reference steps on its own gradient. "pooled": it reaches its mode's reference through the tie
            ``theta_i = a_i theta_ref + b_i``, as the least-squares estimate ``(g_ref + sum_i a_i g_i) / (1 +
            sum_i a_i^2)`` over the mode's embedded elements (packed phase only; see the module).
    """

    every: int = 2
    fraction: float = 0.1
    pack: bool | None = None
    embedded_gradient: str = "dropped"

    name: ClassVar[str] = "gradual"
    supports_sharding: ClassVar[bool] = True
    communication_hook: ClassVar[bool] = True
    state_keys: ClassVar[tuple[str, ...]] = ("decomposition", "embedding")
    state_settings: ClassVar[tuple[str, ...]] = (*Decomposed.state_settings, "pack")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("every", check_int("every", self.every, low=1))
        self._set("fraction", check_real("fraction", self.fraction, low=0, high=1, low_open=True))
        if self.pack is not None and not isinstance(self.pack, bool):
            raise TypeError(f"pack must be True, False or None, got {self.pack!r}")
        if self.embedded_gradient not in EMBEDDED_GRADIENTS:
            raise ValueError(f"embedded_gradient must be one of {', '.join(map(repr, EMBEDDED_GRADIENTS))}, got "
                             f"{self.embedded_gradient!r}")

    def check(self, setup: Setup) -> None:
        super().check(setup)
        if self.embedded_gradient == "pooled" and not self.packs(setup):
            raise ValueError(f"embedded_gradient='pooled' needs the packed phase, and pack={self.pack} with base "
                             f"{setup.make_base.optimizer_name} steps whole tensors: pass pack=True (an elementwise "
                             "base) or keep embedded_gradient='dropped'")

    def packs(self, setup: Setup) -> bool:
        """Whether the phase packs the live elements with this base."""
        return setup.make_base.optimizer_name in ELEMENTWISE if self.pack is None else self.pack

    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> GradualPhase:
        d, references = self.fit(setup, warmup.recorder, steps_taken, keep=True)
        embedding = GradualEmbedding(d, setup.local_tracked(), self.every, self.fraction, sharding=setup.sharding,
                                     references=references)
        return GradualPhase(setup, embedding, self.packs(setup), self.snapshot_every, self.report(d, setup),
                            base_state=warmup.optimizer.state, pooled=self.embedded_gradient == "pooled")

    def load(self, setup: Setup, envelope: dict, extra: dict) -> GradualPhase:
        """The gradual phase from saved state, built beside the live one (every entry checked first)."""
        if not isinstance(extra.get("decomposition"), dict) or not isinstance(extra.get("embedding"), dict):
            raise ValueError("the gradual-phase state_dict needs 'decomposition' and 'embedding'")
        fit, state = extra["decomposition"], extra["embedding"]
        if setup.sharding is not None:
            fit, state = local_state(fit, state, setup.sharding)
        d = Decomposition.from_state_dict(fit)
        embedding = GradualEmbedding(d, setup.local_tracked(), self.every, self.fraction, state=state,
                                     sharding=setup.sharding)
        phase = GradualPhase(setup, embedding, self.packs(setup), self.snapshot_every, extra.get("fit", {}),
                             pooled=self.embedded_gradient == "pooled")
        load_base_state(phase.optimizer, phase.local_envelope(envelope))
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
    Its public attributes: ``embedding``, ``packed``, ``packs``, ``pooled`` (``embedded_gradient="pooled"``: each
    pack holding a reference steps on its pooled gradient, see the module).

    Under FSDP2 the packs hold this rank's live elements (``embedding.params`` are its shards), and the base
    optimizer's ``state_dict`` gives each pack's per-element state spread over its parameter's shard (0 at the
    embedded elements) as a DTensor shaped like the parameter (the live counts differ by rank, which a DTensor
    cannot describe); :meth:`local_envelope` takes them back.
    """

    name = "gradual"
    reduced = True

    def __init__(self, setup: Setup, embedding: GradualEmbedding, packed: bool, snapshot_every: int,
                 fit_report: dict, base_state=None, pooled: bool = False) -> None:
        self.setup, self.embedding, self.packed, self.pooled = setup, embedding, packed, pooled
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
                    entry = {key: gather(setup.local(value), pos).clone() if _per_element(key, value, p) else value
                             for key, value in entry.items()}
                self.optimizer.state[stand_in.get(p, p)] = entry
        if packed and setup.sharding is not None:
            self.optimizer.register_state_dict_post_hook(lambda optimizer, envelope: self._sharded_envelope(envelope))
        self._references = None  # the references' values after the last step, for the snapshot after it
        if pooled:
            self._pool_setup()

    def _pool_setup(self) -> None:
        """(pooled) At the switch and after each round: per pack holding references, their slots, their modes and
        each one's float64 ``1 / (1 + sum_i a_i^2)`` over its mode's embedded elements (of all ranks: one
        all-reduce under FSDP2)."""
        squares = self.embedding.slope_squares()
        if self.setup.sharding is not None:
            self.setup.sharding.all_reduce([squares])
        scale = 1 / (1 + squares)
        self._reference_slots = [(index, slots, modes, scale.to(modes.device)[modes])
                                 for index, slots, modes in self.embedding.reference_slots()]

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

    def mode_sums_of(self, params, grads) -> torch.Tensor | None:
        """For a communication hook: (M,) float64, per mode ``sum_i a_i g_i`` over the embedded elements of
        ``params`` (a bucket; ``grads`` theirs), which it sends with the live elements; None unless pooled."""
        if not self.pooled:
            return None
        aligned = [None] * len(self._index)
        for p, g in zip(params, grads):
            if p in self._index:
                aligned[self._index[p]] = g
        return self.embedding.mode_sums(aligned)

    def _pool(self, sums: torch.Tensor | None) -> None:
        """(pooled) Each reference's gradient in its pack becomes ``(g_ref + sums) / (1 + sum_i a_i^2)`` of its
        mode; ``sums`` (M,) are those a hook exchanged, or None: this rank's gradients' (added over the ranks
        under FSDP2)."""
        if sums is None:
            sums = self.embedding.mode_sums([self.setup.local(p.grad) for p in self.setup.params.tracked])
            if self.setup.sharding is not None:
                self.setup.sharding.all_reduce([sums])
        for index, slots, modes, scale in self._reference_slots:
            grad = self.packs[index].grad
            if grad is not None:
                grad[slots] = ((grad[slots].double() + sums.to(grad.device)[modes]) * scale).to(grad.dtype)

    def _moving(self) -> list[torch.Tensor]:
        """This rank's parts of the tracked parameters that have a gradient."""
        return [local for p, local in zip(self.setup.params.tracked, self.embedding.params) if p.grad is not None]

    # ------------------------------------------------------------------ stepping
    def step(self, loss, closure: Callable | None) -> bool:
        exchanged = self.setup.exchange.check_exchanged()
        for inner, visible in zip(self.optimizer.param_groups, self.setup.params.groups):
            inner.update(hyperparameters(visible))
        tracked, local = self.setup.params.tracked, self.embedding.params
        if self.packed:
            for p, part, q, pos in zip(tracked, local, self.packs, self.embedding.positions):
                if p.grad is not None:
                    q.data = gather(part.detach(), pos).clone()
                    q.grad = gather(self.setup.local(p.grad).detach(), pos).clone()
            if self.pooled:
                self._pool(exchanged)
        stepped = [q for group in self.optimizer.param_groups for q in group["params"]]
        try:
            took = self.setup.all_finite(q.grad for q in stepped) and guarded_step(self.optimizer, loss, closure,
                                                                                   stepped)
            if took and self.packed:
                with torch.no_grad():
                    for part, q, pos in zip(local, self.packs, self.embedding.positions):
                        if q.grad is not None:
                            _scatter(part, pos, q.detach())
        finally:
            for q in self.packs:
                q.data, q.grad = _placeholder(q.numel(), q), None
        if took:
            self._references = self.embedding.reference_values()
            self.embedding.follow(self._moving(), self._references)
        return took

    def after_step(self, steps_taken: int) -> None:
        if steps_taken % self.snapshot_every:
            return
        kept = self.embedding.observe(self._moving(), self._references)
        if kept is not None and self.packed:
            self._repack(kept)
            if self.pooled:
                self._pool_setup()

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
        """Under FSDP2 what differs by rank is one DTensor per tracked parameter (:func:`sharded_state`)."""
        if self.setup.sharding is None:
            fit, state = self.decomposition.state_dict(), self.embedding.state_dict()
        else:
            fit, state = sharded_state(self.embedding)
        return {"decomposition": fit, "embedding": state, "fit": dict(self.fit_report)}

    def _packed_numbers(self) -> dict[int, int]:
        """The base optimizer's state_dict number of each pack -> its tracked index."""
        where = {id(q): index for index, q in enumerate(self.packs)}
        order = [q for group in self.optimizer.param_groups for q in group["params"]]
        return {number: where[id(q)] for number, q in enumerate(order) if id(q) in where}

    def _sharded_envelope(self, envelope: dict) -> dict:
        """(FSDP2, packed) The base optimizer's ``envelope`` with each pack's per-element state spread over its
        parameter's shard, as a DTensor shaped like the parameter (see the class)."""
        state = envelope["state"]
        for number, index in self._packed_numbers().items():
            if number in state:
                state[number] = {key: self._spread(value, index) if _per_element(key, value, self.packs[index])
                                 else value for key, value in state[number].items()}
        return envelope

    def _spread(self, values: torch.Tensor, index: int) -> torch.Tensor:
        """A pack's per-element ``values`` at their elements of tracked parameter ``index``'s shard, 0 elsewhere."""
        shard = torch.zeros_like(self.embedding.params[index], dtype=values.dtype)
        _scatter(shard, self.embedding.positions[index], values)
        return self.setup.sharding.global_view(shard, index)

    def local_envelope(self, envelope: dict) -> dict:
        """A saved base-optimizer ``envelope`` for this phase's optimizer: under FSDP2 (packed) each pack's
        DTensor state back at this rank's live elements; otherwise as it is."""
        state = envelope.get("state")
        if not (self.packed and self.setup.sharding is not None and isinstance(state, dict)):
            return envelope
        state = dict(state)
        for number, index in self._packed_numbers().items():
            if isinstance(state.get(number), dict):
                state[number] = {key: gather(self.setup.local(value), self.embedding.positions[index])
                                 if is_sharded(value) else value for key, value in state[number].items()}
        return {**envelope, "state": state}

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
