"""What every phase of a CMDOptimizer provides, the settings they share, and a guarded optimizer step.

A :class:`CMDOptimizer` holds one phase at a time: the warm-up (:class:`~cmd_optim.optim.warmup.WarmupPhase`)
and, after the switch, the phase its reduction (:class:`~cmd_optim.optim.reduction.Reduction`) builds. The
optimizer validates, counts and keeps the state_dict envelope; a phase steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from ._params import BaseFactory, ParamSet, all_finite, hyperparameters
from .exchange import ModeExchange
from .sharding import Sharding

__all__ = ["NonFiniteStep", "Phase", "Setup", "guarded_step"]


@dataclass
class Setup:
    """The settings and parameters that every phase of one optimizer shares (fixed at construction)."""

    params: ParamSet
    make_base: BaseFactory
    switch_after: int
    exchange: ModeExchange
    sharding: Sharding | None = None  # FSDP2: the tracked parameters are row shards
    process_group: object = None  # the ranks of this group hold replicas (``process_group=``, a DDP module)

    @property
    def tracked_matrices(self) -> list[torch.Tensor]:
        """The tracked parameters with two or more dimensions, in tracking order."""
        return [p for p in self.params.tracked if p.ndim >= 2]

    def replica_group(self):
        """The process group whose ranks hold replicas of the tracked parameters, as the user declared it: the
        optimizer's ``process_group`` (given, or a DDP module's), else a registered CMD hook's (its
        ``process_group``, the default group if None). None when nothing declared it, outside torch.distributed,
        or under FSDP2 (the ranks hold shards: ``sharding.group``). Only these ranks take part in collectives."""
        if self.sharding is not None or not (dist.is_available() and dist.is_initialized()):
            return None
        if self.process_group is not None:
            return self.process_group
        if self.exchange.hooked:
            return dist.group.WORLD if self.exchange.process_group is None else self.exchange.process_group
        return None

    def local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of a tracked parameter or gradient (the tensor itself without sharding)."""
        return t if self.sharding is None else self.sharding.local(t)

    def local_tracked(self) -> list[torch.Tensor]:
        """This rank's parts of the tracked parameters, in decomposition order."""
        return [self.local(p) for p in self.params.tracked]

    @property
    def shard_sum(self):
        """Under FSDP2 ``sharding.all_reduce`` (adds a list of tensors over the ranks, in place); else None."""
        return None if self.sharding is None else self.sharding.all_reduce

    def all_finite(self, tensors) -> bool:
        """:func:`all_finite` of this rank's parts, agreed across the ranks when sharded (a NaN lands in one
        rank's shard only, and every rank must skip the step)."""
        finite = all_finite(self.local(t) for t in tensors)
        return finite if self.sharding is None else self.sharding.agree(finite)

    def base_on_copies(self) -> torch.optim.Optimizer:
        """A new base optimizer on copies of the visible group dicts (see :meth:`adopt_groups`)."""
        return self.make_base([dict(group) for group in self.params.groups])

    def adopt_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` step on the visible group dicts: their settings are updated in place from the
        optimizer's groups, and the optimizer's ``param_groups`` becomes the visible list itself."""
        for visible, own in zip(self.params.groups, optimizer.param_groups):
            visible.update(hyperparameters(own))
        optimizer.param_groups = self.params.groups


class Phase(Protocol):
    """One phase of a CMDOptimizer. A reduced phase documents, as public attributes, what it shows a user
    (``CMDOptimizer.reduced_phase``)."""

    name: str  #: "warmup", or the name of the reduction that built it
    reduced: bool  #: True after the switch
    optimizer: torch.optim.Optimizer  #: the torch optimizer that steps; its state_dict is the envelope

    def adopt(self) -> None:
        """Called once the phase has become the live one."""

    def release(self) -> None:
        """Called when the phase stops being the live one."""

    def step(self, loss, closure: Callable | None) -> bool:
        """One step; False if it was skipped (a non-finite gradient), leaving weights and state alone."""

    def after_step(self, steps_taken: int) -> None:
        """Bookkeeping after a step was taken (snapshots, online refits)."""

    def trainable_dims(self) -> int:
        """How many numbers the stepping optimizer updates per step."""

    def state_bytes(self) -> int:
        """Bytes of state ``step()`` uses."""

    def extra_state(self) -> dict:
        """The phase's own state beside the envelope: tensors and plain values only."""

    def report(self) -> dict:
        """What ``switch_report`` shows of the phase (plain values)."""


class NonFiniteStep(Exception):
    """A closure re-evaluation inside an optimizer step produced non-finite gradients."""


def guarded_step(optimizer: torch.optim.Optimizer, loss, closure: Callable | None, watched: Sequence[torch.Tensor],
                 reevaluate: Callable | None = None, restore: Sequence[torch.Tensor] = ()) -> bool:
    """``optimizer.step`` whose closure returns the already computed ``loss`` on its first call.

    Later calls (LBFGS re-evaluates during its line search) run ``reevaluate`` (default ``closure``) and
    check the gradients of ``watched``: if one is not finite, the step is undone (``watched`` and
    ``restore`` set back to their values before it, LBFGS's own state too) and False is returned.
    """
    if closure is None:
        optimizer.step()
        return True
    reevaluate = reevaluate or closure
    keep = list(watched) + list(restore)
    lbfgs = isinstance(optimizer, torch.optim.LBFGS)
    saved = [p.detach().clone() for p in keep] if lbfgs else None
    saved_state = copy.deepcopy(dict(optimizer.state)) if lbfgs else None  # its history and direction
    pending = [loss]

    def replay():
        if pending:
            return pending.pop()
        with torch.enable_grad():
            value = reevaluate()
        if not all_finite([torch.as_tensor(value).detach(), *(p.grad for p in watched)]):
            raise NonFiniteStep
        return value

    try:
        optimizer.step(replay)
    except NonFiniteStep:
        if saved is None:
            raise RuntimeError(f"{type(optimizer).__name__} re-evaluated the closure and got non-finite "
                               "gradients; the step it had begun cannot be undone") from None
        with torch.no_grad():
            for p, value in zip(keep, saved):
                p.copy_(value)
        optimizer.state.clear()
        optimizer.state.update(saved_state)
        return False
    return True
