"""CMDOptimizer: a warm-up with any torch.optim optimizer, then a reduced phase chosen by a reduction."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import Decomposition
from ..core._checks import check_int, check_real
from ._dist_checks import refuse_sharding, world_size
from ._params import BaseFactory, gather_params, hyperparameters, tensor_bytes
from .exchange import ModeExchange
from .phase import Phase, Setup
from .reduction import REDUCTIONS, Reduction, choose_default, resolve
from .sharding import Sharding, is_sharded
from .warmup import WarmupPhase

__all__ = ["CMDOptimizer", "SwitchNotice", "find_cmd_optimizer", "optimizer_state_bytes"]

_STATE_VERSION = 2
_log = logging.getLogger("cmd_optim")


class SwitchNotice(UserWarning):
    """What a CMDOptimizer says at its switch, and when it is discarded before the switch, where the
    ``"cmd_optim"`` logger would not show it (no handler for INFO). Silence it with
    ``warnings.filterwarnings("ignore", category=SwitchNotice)``, or configure that logger."""


_INTERNAL = tuple(os.path.dirname(module.__file__) for module in (torch, sys.modules[__name__.split(".")[0]])) + (
    weakref.__file__,)


def _say(message: str) -> None:
    """``message`` to the "cmd_optim" logger at INFO, or as a :class:`SwitchNotice` where nothing shows that,
    attributed to the first caller outside cmd_optim and torch (the user's ``step()`` line)."""
    _log.info(message)
    if not (_log.isEnabledFor(logging.INFO) and _log.hasHandlers()):
        frame, level = sys._getframe(0), 1
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, SwitchNotice, stacklevel=level)


@dataclasses.dataclass
class _Progress:
    """Steps taken and whether the switch came: what the optimizer's finalizer reads once it is gone."""

    steps: int
    reduced: bool
    switch_after: int
    base: str
    told: bool = False  # the end was said already (:meth:`CMDOptimizer.training_ended`)


def _discarded(progress: _Progress) -> None:
    if not progress.steps or progress.reduced or progress.told:
        return
    where = (f"before the switch at step {progress.switch_after}" if progress.steps < progress.switch_after
             else "without switching (its switch did not succeed)")
    _say(f"a CMDOptimizer ended after {progress.steps} steps {where}: it trained as plain {progress.base} "
         "throughout")


class CMDOptimizer(torch.optim.Optimizer):
    """Trains with a base optimizer for ``switch_after`` steps (the warm-up), then switches to a reduced phase.

    The reduced phase is chosen by ``reduction``: by default :class:`~cmd_optim.optim.lowrank.LowRank` (the base
    keeps its state only inside a refreshed low-rank subspace of each weight matrix; it keeps learning), or
    the paper's :class:`~cmd_optim.optim.modes.Modes` when ``modes=`` is passed (only the mode coefficients
    train: ``CMDOptimizer(model, base=torch.optim.SGD, modes=10, lr=0.05)`` trains at most 10 numbers per
    parameter group after the switch) or where the low-rank reduction cannot run (LBFGS).

    Args:
        model: an ``nn.Module``, or an iterable of parameters, of ``(name, parameter)`` pairs, or of
            parameter-group dicts (whose ``"params"`` hold either). A parameter listed twice (tied
            weights) counts once and answers to every name it has.
        base: a ``torch.optim.Optimizer`` subclass, or a callable ``param_groups -> Optimizer``.
        modes, samples, seed, snapshot_every, snapshot_device, snapshot_dtype, snapshot_dir,
        keep_decomposition: shortcuts that configure the reduction (``modes=8`` is ``reduction=Modes(modes=8)``;
            see :class:`~cmd_optim.optim.decomposed.Decomposed`). One the chosen reduction does not use is
            refused (``TypeError`` naming it and the reductions that use it); ``seed`` is used by all three.
        switch_after: optimizer steps of ordinary training (the warm-up) before the switch. Not the
            learning-rate warm-up of a scheduler (``warmup_steps``, its old name, is a deprecated alias).
        keep_free: a ``fnmatch`` pattern of parameter names, or several (e.g. ``"classifier.*"``), that keep
            ordinary training with the base optimizer after the switch. Parameters with
            ``requires_grad=False`` at construction are kept free too (and train if they are unfrozen).
        reduction: ``"lowrank"``, ``"modes"``, ``"gradual"`` (the paper's embedded CMD), or an instance of
            :class:`LowRank`, :class:`Modes`, :class:`Gradual` (any registered reduction). ``switch_report``
            names the one in use.
        process_group: a torch.distributed group whose ranks hold replicas of these parameters (DDP's, e.g.
            ``torch.distributed.group.WORLD``): they then check at the switch that they found the same
            decomposition, and the low-rank phase keeps them bit-identical. Taken from ``model`` when it is a
            DistributedDataParallel module, or from ``register_cmd_hook``. Without any of these the optimizer
            runs no collective, even under torch.distributed (its rank trains alone); FSDP2 shards carry
            their own group. See docs/distributed.md.
        **base_kwargs: passed to ``base`` (``lr``, ``momentum``, ``betas``, ...).

    Hyperparameters live in ``param_groups`` (the model's parameters, as with any torch optimizer); the
    optimizer that steps reads them at every step, so LR schedulers keep working in every phase.
    ``state_dict()`` is the stepping optimizer's ``{"state", "param_groups"}`` plus a ``"cmd"`` entry.
    See docs/optimizer.md.
    """

    def __init__(
        self,
        model: nn.Module | Iterable,
        base: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        modes: int | None = None,
        switch_after: int | None = None,
        snapshot_every: int | None = None,
        samples: int | None = None,
        seed: int | None = None,
        keep_free: str | Iterable[str] = (),
        snapshot_device: torch.device | str | None = None,
        snapshot_dtype: torch.dtype | None = None,
        snapshot_dir: str | None = None,
        reduction: str | Reduction | None = None,
        keep_decomposition: bool | None = None,
        *,
        warmup_steps: int | None = None,
        max_coefficient: float | None = None,
        embed: str | None = None,
        embed_every: int | None = None,
        embed_fraction: float | None = None,
        process_group=None,
        **base_kwargs,
    ) -> None:
        switch_after = check_int("switch_after" if warmup_steps is None else "warmup_steps",
                                 _renamed("warmup_steps", warmup_steps, "switch_after", switch_after, 300), low=1)
        given = dict(modes=modes, samples=samples, seed=seed, snapshot_every=snapshot_every,
                     snapshot_device=snapshot_device, snapshot_dtype=snapshot_dtype, snapshot_dir=snapshot_dir,
                     keep_decomposition=keep_decomposition)
        shortcuts = {key: value for key, value in given.items() if value is not None}
        reduction = _deprecated_reduction(reduction, shortcuts, max_coefficient, embed, embed_every, embed_fraction)
        chosen = resolve(reduction, shortcuts)
        params = gather_params(model, keep_free)
        refuse_sharding(model, [p for g in params.groups for p in g["params"]], base)
        sharded = [is_sharded(p) for p in params.tracked]
        if any(sharded) and not all(sharded):
            raise TypeError("some tracked parameters are FSDP2 shards and some are not: shard the whole model "
                            "with fully_shard, or keep the unsharded ones free (keep_free)")
        if isinstance(model, nn.parallel.DistributedDataParallel) and process_group is None:
            process_group = model.process_group
        if process_group is not None and any(sharded):
            raise TypeError("process_group declares ranks that hold replicas; FSDP2 shards carry their own group: "
                            "leave it out")
        make_base = BaseFactory(base, base_kwargs)
        if chosen is None:
            chosen = choose_default(make_base.optimizer_name, all(sharded), shortcuts)
        refusal = chosen.refusal(make_base.optimizer_name, all(sharded))
        if refusal is not None:
            able = [name for name, cls in REDUCTIONS.items()
                    if cls().refusal(make_base.optimizer_name, all(sharded)) is None]
            raise ValueError(f"{refusal}: use reduction={able[0]!r}" if able else refusal)
        self.reduction = chosen
        self._setup = Setup(params, make_base, switch_after, ModeExchange(params.tracked),
                            sharding=Sharding(params.tracked) if all(sharded) else None, process_group=process_group)
        self.reduction.check(self._setup)
        self._phase: Phase = WarmupPhase(self._setup, recorder=self.reduction.warmup_recorder(self._setup))
        self._constructing = True
        super().__init__(params.groups, self._phase.optimizer.defaults)
        self._constructing = False
        self.param_groups = params.groups  # the very list the stepping optimizer steps on
        self._progress = _Progress(0, False, switch_after, make_base.optimizer_name)
        weakref.finalize(self, _discarded, self._progress)
        self.skipped_steps = 0
        self.decomposition: Decomposition | None = None
        self.switch_report: dict | None = None

    # ------------------------------------------------------------------ public view
    @property
    def state(self):
        """The per-parameter state of the optimizer that steps now (torch.optim's ``state``)."""
        return self._phase.optimizer.state

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty one
        pass

    @property
    def phase(self) -> str:
        """``"warmup"`` until ``switch_after`` optimizer steps were taken, then ``"reduced"``."""
        return "reduced" if self._phase.reduced else "warmup"

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken (skipped non-finite ones not counted); the switch comes after ``switch_after``."""
        return self._progress.steps

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:
        self._progress.steps = value

    def training_ended(self) -> None:
        """Say (a UserWarning) that training ended before the switch, if it did; called by a training loop's end
        (``CMDCallback`` under the Trainer). The optimizer then says nothing more of it when it is discarded."""
        if self._phase.reduced:
            return
        self._progress.told = True
        warnings.warn(
            f"training ended after {self.steps_taken} optimizer steps, before CMD's switch at step "
            f"{self.switch_after}: the run was ordinary {self.base_name} training. "
            "Lower switch_after (it counts optimizer steps, not the scheduler's warmup_steps) or train longer.",
            stacklevel=3)  # the loop that ended (the Trainer's callback handler, under CMDCallback)

    @property
    def base_name(self) -> str:
        """The class name of the base optimizer (e.g. ``"AdamW"``)."""
        return self._setup.make_base.optimizer_name

    @property
    def switch_after(self) -> int:
        return self._setup.switch_after

    @property
    def warmup_steps(self) -> int:
        """Deprecated alias of :attr:`switch_after`."""
        return self._setup.switch_after

    @property
    def snapshot_every(self) -> int | None:
        """Warm-up steps between two snapshots, for a reduction that records them (else None)."""
        return getattr(self.reduction, "snapshot_every", None)

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer each step is delegated to: the base optimizer in the warm-up (and with
        :class:`Gradual`); after the switch the base optimizer class rebuilt on what the reduced phase trains
        (the low-rank cores, or the mode coefficients) plus the parameters trained in full."""
        return self._phase.optimizer

    @property
    def reduced_phase(self) -> Phase | None:
        """The live reduced phase after the switch (None in the warm-up). Its public attributes:
        :class:`~cmd_optim.optim.lowrank.LowRankPhase` ``plans``, ``ranks``, ``refreshes``;
        :class:`~cmd_optim.optim.modes.ModePhase` ``coefficients``, ``limited_steps``, ``map``;
        :class:`~cmd_optim.optim.gradual.GradualPhase` ``embedding``."""
        return self._phase if self._phase.reduced else None

    @property
    def embedding(self):
        """``reduced_phase.embedding`` after a :class:`Gradual` switch, else None."""
        return getattr(self.reduced_phase, "embedding", None)

    @property
    def sharding(self) -> Sharding | None:
        """Under FSDP2, where this rank's rows of the tracked parameters lie (``sharding.mesh``); else None."""
        return self._setup.sharding

    @property
    def exchange(self) -> ModeExchange:
        """The object a communication hook uses (``cmd_optim.integrations.ddp.register_cmd_hook``)."""
        return self._setup.exchange

    @property
    def mode_exchange(self) -> ModeExchange:
        """Alias of :attr:`exchange`."""
        return self._setup.exchange

    @property
    def trainable_dims(self) -> int:
        """How many numbers the stepping optimizer updates per step now."""
        return self._phase.trainable_dims()

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the warm-up's recording now (the snapshots of the CMD reductions; 0 after the switch)."""
        recorder = getattr(self._phase, "recorder", None)
        return recorder.nbytes if recorder is not None else 0

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state ``step()`` uses now: in the warm-up the base optimizer's state and the
        snapshots; after the switch what the reduced phase keeps (its maps and its optimizer's state)."""
        return self._phase.state_bytes()

    @property
    def limited_steps(self) -> int:
        """``reduced_phase.limited_steps`` of the mode reduction: steps cut back by the speed limit (else 0)."""
        return getattr(self.reduced_phase, "limited_steps", 0)

    @property
    def mode_coefficients(self) -> list[torch.Tensor]:
        """``reduced_phase.coefficients`` of the mode reduction, one vector per parameter group (else empty)."""
        return list(getattr(self.reduced_phase, "coefficients", []))

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_constructing", True):
            raise NotImplementedError("CMDOptimizer cannot take new parameter groups after construction")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One optimizer step; a step whose gradients are not all finite is skipped and counted."""
        if self._switch_due():  # a switch that raised is retried before anything else moves
            self._switch()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        undo = self._undo_point()
        self._count(self._phase.step(loss, closure), undo)
        return loss

    @torch.compiler.disable
    def _undo_point(self):
        """In the warm-up, before a step after which a snapshot is recorded: how to undo the step."""
        return None if self._phase.reduced else self._phase.undo_point(self.steps_taken + 1)

    @torch.compiler.disable  # plain-Python bookkeeping, kept out of a compiled step's graph
    def _count(self, taken: bool, undo=None) -> None:
        """Count a step (``taken``) or a skipped one; after a taken step the phase's bookkeeping and the switch.
        A recording that fails after the step (a full disk, a weight float16 cannot hold) undoes the step:
        the optimizer and the weights are as they were before it, and the error propagates."""
        if not taken:
            self.skipped_steps += 1
            return
        self.steps_taken += 1
        try:
            self._phase.after_step(self.steps_taken)
        except Exception:
            if undo is not None:
                self.steps_taken -= 1
                undo()
            raise
        if self._switch_due():
            self._switch()

    def _switch_due(self) -> bool:
        return not self._phase.reduced and self.steps_taken >= self._setup.switch_after

    @torch.compiler.disable
    def _switch(self) -> None:
        """Build the reduced phase from the warm-up. Nothing changes unless every part succeeds, so a switch
        that raises leaves the warm-up intact (it can be saved, and the next step retries)."""
        warmup = self._phase
        if not warmup.saw_gradient:
            raise RuntimeError(
                f"no parameter got a gradient in the {self.steps_taken} warm-up steps (step() without a backward?): "
                "there is nothing to build a reduced phase from. The optimizer stays in the warm-up and retries at "
                "the next step.")
        reduced = self.reduction.build(self._setup, warmup, self.steps_taken)
        report = {"step": self.steps_taken, "reduction": self.reduction.name,
                  "trainable_dims": reduced.trainable_dims(), **reduced.report()}
        self.switch_report = report
        self._install(reduced)
        self.decomposition = getattr(reduced, "decomposition", None)
        alone = self._setup.sharding is None and self._setup.replica_group() is None and world_size() > 1
        _say(f"CMDOptimizer switched to reduction {self.reduction.name!r} at step {self.steps_taken}: "
             f"{report['trainable_dims']} trainable numbers, {reduced.state_bytes()} bytes of optimizer state "
             f"(the base {self.base_name} kept {tensor_bytes(warmup.optimizer.state)} in the warm-up)"
             + (f"; this rank of {world_size()} switched alone, with no collective (nothing declared replicas: "
                "under DDP pass the DDP module or process_group=, or register_cmd_hook)" if alone else ""))

    def _install(self, phase: Phase) -> None:
        """Make ``phase`` the live phase (nothing in here can fail)."""
        self._phase.release()
        self._phase = phase
        phase.adopt()
        self._progress.reduced = phase.reduced

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._phase.reduced:  # the cores or coefficients the reduced phase steps
            self._phase.optimizer.zero_grad(set_to_none=set_to_none)
        self._setup.exchange.clear()

    # ------------------------------------------------------------------ state
    @torch.compiler.disable
    def state_dict(self) -> dict:
        """torch's envelope of the stepping optimizer (``"state"``, ``"param_groups"``) plus ``"cmd"``.

        Tensors and plain Python values only (``torch.load(..., weights_only=True)`` reads it). In the
        warm-up ``"cmd"`` holds the snapshots taken so far, so that a resumed run decomposes the same
        trajectory; after the switch the reduced phase's own state under ``"cmd"]["phase_state"]``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        envelope = self._phase.optimizer.state_dict()
        envelope["cmd"] = {
            "version": _STATE_VERSION, "phase": self._phase.name, "reduction": self.reduction.name,
            "base": self._setup.make_base.optimizer_name, "switch_after": self._setup.switch_after,
            "tracked_numel": _tracked_numel(self._setup),
            "steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps,
            "visible_groups": [hyperparameters(group) for group in self.param_groups],
            "switch_report": self.switch_report, "phase_state": self._phase.extra_state(),
            "settings": {key: getattr(self.reduction, key) for key in self.reduction.state_settings},
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, envelope)
            if result is not None:
                envelope = result
        return envelope

    @torch.compiler.disable
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from any phase into this optimizer at any phase. Everything is checked and the new
        phase built beside the live one first: on any error the optimizer is exactly as it was."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        cmd = self._check_envelope(state_dict)
        saved = cmd["phase_state"]
        if cmd["phase"] == WarmupPhase.name:
            def recorder_for(extra):
                return self.reduction.warmup_recorder(self._setup, {**extra, "steps_taken": cmd["steps_taken"]})

            phase = WarmupPhase.load(self._setup, state_dict, saved, recorder_for)
        else:
            phase = self.reduction.load(self._setup, state_dict, saved)
        # commit: nothing below raises
        for visible, saved in zip(self.param_groups, cmd["visible_groups"]):
            visible.update(saved)
        self._install(phase)
        self.steps_taken, self.skipped_steps = cmd["steps_taken"], cmd["skipped_steps"]
        self.switch_report = cmd.get("switch_report")
        self.decomposition = getattr(phase, "decomposition", None)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_envelope(self, state_dict: dict) -> dict:
        cmd = state_dict.get("cmd")
        if not isinstance(cmd, dict) or cmd.get("version") != _STATE_VERSION:
            raise ValueError("not a CMDOptimizer state_dict (no 'cmd' entry of this version); a plain torch.optim "
                             "state cannot be loaded into a CMDOptimizer")
        if cmd.get("phase") not in (WarmupPhase.name, *REDUCTIONS):
            raise ValueError(f"unknown CMDOptimizer phase {cmd.get('phase')!r} in the state_dict")
        if not isinstance(cmd.get("phase_state"), dict):
            raise ValueError("the state_dict's 'cmd' has no 'phase_state' dict")
        if cmd["phase"] != WarmupPhase.name and cmd.get("reduction") != self.reduction.name:
            raise ValueError(f"state_dict was saved with reduction={cmd.get('reduction')!r}, this optimizer has "
                             f"reduction={self.reduction.name!r}")
        if cmd.get("base") != self._setup.make_base.optimizer_name:
            raise ValueError(f"state_dict was saved with base optimizer {cmd.get('base')}, this optimizer uses "
                             f"{self._setup.make_base.optimizer_name}")
        for key, ours in (("switch_after", self._setup.switch_after), ("tracked_numel", _tracked_numel(self._setup))):
            if cmd.get(key) != ours:
                raise ValueError(f"state_dict was saved with {key}={cmd.get(key)}, this optimizer has {key}={ours}")
        saved = cmd.get("settings")
        if not isinstance(saved, dict):
            raise ValueError("the state_dict's 'cmd' has no 'settings' dict")
        for key in self.reduction.state_settings:
            if key in saved and saved[key] != getattr(self.reduction, key):
                raise ValueError(f"state_dict was saved with {key}={saved[key]}, this optimizer has "
                                 f"{key}={getattr(self.reduction, key)}")
        for key in ("steps_taken", "skipped_steps"):
            if not isinstance(cmd.get(key), int) or cmd[key] < 0:
                raise ValueError(f"state_dict's {key!r} must be a non-negative integer, got {cmd.get(key)!r}")
        groups = cmd.get("visible_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups) or not all(
                isinstance(group, dict) for group in groups):
            count = len(groups) if isinstance(groups, list) else groups
            raise ValueError(f"state_dict has {count} parameter groups, this optimizer has {len(self.param_groups)}")
        if not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("state_dict has no 'param_groups' list")
        return cmd

    def __getstate__(self) -> dict:
        # Every phase object, not only torch.optim's three attributes; without the ``step`` wrapper an LR
        # scheduler installs on the instance (a copy has no scheduler).
        return {key: value for key, value in self.__dict__.items() if key != "step"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        inner = self._phase.optimizer
        if isinstance(inner, torch.optim.LBFGS) and not hasattr(inner, "_params"):
            # torch's LBFGS keeps two attributes that its own __getstate__ drops
            inner._params, inner._numel_cache = inner.param_groups[0]["params"], None

    def __repr__(self) -> str:
        return (f"CMDOptimizer(phase={self.phase!r}, reduction={self.reduction!r}, "
                f"switch_after={self._setup.switch_after}, trainable_dims={self.trainable_dims}, "
                f"base={self.base_name})")


def _tracked_numel(setup: Setup) -> int:
    return sum(p.numel() for p in setup.params.tracked)


def _renamed(old: str, old_value, new: str, new_value, default):
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"pass {new} only ({old} is its deprecated name)")
    warnings.warn(f"{old} is deprecated, use {new} (it counts optimizer steps before the switch, not the "
                  "learning-rate warm-up)", FutureWarning, stacklevel=3)
    return old_value


def _deprecated_reduction(reduction, shortcuts: dict, max_coefficient, embed, embed_every, embed_fraction):
    """``reduction`` from the deprecated ``embed`` / ``max_coefficient`` spellings (each checked under the name
    the user passed), or as it was."""
    if embed is None and embed_every is None and embed_fraction is None and max_coefficient is None:
        return reduction
    if reduction not in (None, "modes"):
        raise TypeError("pass reduction= only (embed, embed_every, embed_fraction and max_coefficient are its "
                        "deprecated spellings)")
    warnings.warn("embed=, embed_every=, embed_fraction= and max_coefficient= are deprecated: use "
                  "reduction=Gradual(every=..., fraction=...) or reduction=Modes(max_slope=...)", FutureWarning,
                  stacklevel=3)
    if embed not in (None, "all", "gradual"):
        raise ValueError(f"embed must be 'all' or 'gradual', got {embed!r}")
    if embed == "gradual":
        every = 2 if embed_every is None else check_int("embed_every", embed_every, low=1)
        fraction = 0.1 if embed_fraction is None else check_real("embed_fraction", embed_fraction, low=0, high=1,
                                                                  low_open=True)
        return REDUCTIONS["gradual"](**shortcuts, every=every, fraction=fraction)
    if max_coefficient is None:
        return REDUCTIONS["modes"](**shortcuts)
    slope = check_real("max_coefficient", max_coefficient, low=0, low_open=True)
    return REDUCTIONS["modes"](**shortcuts, max_slope=slope)


def find_cmd_optimizer(optimizer) -> CMDOptimizer | None:
    """The CMDOptimizer inside ``optimizer`` (unwrapping wrappers such as accelerate's), or None."""
    while optimizer is not None and not isinstance(optimizer, CMDOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state ``optimizer.step()`` uses: ``CMDOptimizer.state_bytes``, or for any other
    optimizer the tensors of its per-parameter state (AdamW: 8 bytes per float32 parameter, plus step counts)."""
    if isinstance(optimizer, CMDOptimizer):
        return optimizer.state_bytes
    return tensor_bytes(optimizer.state)
