"""CMDOptimizer: a warm-up with any torch.optim optimizer, then training through the CMD modes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import Decomposition, decompose, fit_slopes
from ..core._checks import check_device, check_dtype, check_int
from ._dist_checks import check_rank_consistency, refuse_sharding
from ._params import BaseFactory, gather_params, hyperparameters, tensor_bytes
from .exchange import ModeExchange
from .gradual import Gradual
from .lowrank import LowRank
from .modes import Modes
from .phase import Phase, Setup
from .sharding import Sharding, is_sharded
from .warmup import WarmupPhase

__all__ = ["CMDOptimizer", "find_cmd_optimizer", "optimizer_state_bytes"]

_STATE_VERSION = 1


class CMDOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; after ``switch_after`` steps it trains through the CMD modes only.

    Args:
        model: an ``nn.Module``, or an iterable of parameters, of ``(name, parameter)`` pairs, or of
            parameter-group dicts (whose ``"params"`` hold either). A parameter listed twice (tied
            weights) counts once and answers to every name it has.
        base: a ``torch.optim.Optimizer`` subclass, or a callable ``param_groups -> Optimizer``.
        modes: the most CMD modes (M, at most 256); the decomposition may find fewer.
        switch_after: optimizer steps of ordinary training (the warm-up) before the switch. Not the
            learning-rate warm-up of a scheduler (``warmup_steps``, its old name, is a deprecated alias).
        snapshot_every: a snapshot of the tracked parameters is taken every this many steps (and at step 0).
        samples: how many parameter trajectories the clustering sees (K).
        seed: seeds the sampling of the decomposition.
        keep_free: a ``fnmatch`` pattern of parameter names, or several (e.g. ``"classifier.*"``), that keep
            ordinary training with the base optimizer after the switch. Parameters with
            ``requires_grad=False`` at construction are kept free too (and train if they are unfrozen).
        snapshot_device, snapshot_dtype: where and how the warm-up snapshots are kept. They take
            ``(switch_after // snapshot_every + 1) * N * itemsize`` bytes, freed at the switch.
        snapshot_dir: a folder: the snapshots go to a file there instead of memory (read back a chunk of
            columns at a time at the switch, deleted after it). A warm-up state_dict then names that file,
            so a resumed run needs it.
        reduction: what happens after the switch: ``"lowrank"`` / :class:`LowRank` (each matrix trains in a
            refreshed low-rank subspace; no decomposition), ``"modes"`` / :class:`Modes` (the paper's setting:
            train the mode coefficients only) or ``"gradual"`` / :class:`Gradual` (the paper's embedded CMD).
            Default (None): ``LowRank()``, or ``Modes()`` where the low-rank reduction cannot run (LBFGS, which
            takes a single parameter group; FSDP2-sharded parameters). ``switch_report["reduction"]`` names it.
        keep_decomposition: keep the switch's :class:`Decomposition` in ``self.decomposition`` (24 bytes per
            parameter); the mode phase does not need it. The gradual reduction always keeps it.
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
        modes: int = 10,
        switch_after: int | None = None,
        snapshot_every: int = 10,
        samples: int = 1000,
        seed: int = 0,
        keep_free: str | Iterable[str] = (),
        snapshot_device: torch.device | str = "cpu",
        snapshot_dtype: torch.dtype = torch.float32,
        snapshot_dir: str | None = None,
        reduction: str | Modes | Gradual | LowRank | None = None,
        keep_decomposition: bool = False,
        *,
        warmup_steps: int | None = None,
        max_coefficient: float | None = None,
        embed: str | None = None,
        embed_every: int | None = None,
        embed_fraction: float | None = None,
        **base_kwargs,
    ) -> None:
        switch_after = _renamed("warmup_steps", warmup_steps, "switch_after", switch_after, 300)
        chosen = _reduction(reduction, max_coefficient, embed, embed_every, embed_fraction)
        self.modes = check_int("modes", modes, low=1, high=256)
        switch_after = check_int("switch_after", switch_after, low=1)
        snapshot_every = check_int("snapshot_every", snapshot_every, low=1)
        self.samples = check_int("samples", samples, low=1)
        if self.samples < self.modes:
            raise ValueError(f"samples must be >= modes ({self.modes}), got {self.samples}")
        self.seed = check_int("seed", seed, low=0, high=2**63 - 1)
        if not isinstance(keep_decomposition, bool):
            raise TypeError(f"keep_decomposition must be True or False, got {keep_decomposition!r}")
        params = gather_params(model, keep_free)
        refuse_sharding(model, [p for g in params.groups for p in g["params"]], base)
        sharded = [is_sharded(p) for p in params.tracked]
        if any(sharded) and not all(sharded):
            raise TypeError("some tracked parameters are FSDP2 shards and some are not: shard the whole model "
                            "with fully_shard, or keep the unsharded ones free (keep_free)")
        make_base = BaseFactory(base, base_kwargs)
        if chosen is None:  # the default: low-rank where it can run
            chosen = Modes() if make_base.optimizer_name == "LBFGS" or all(sharded) else LowRank()
        self.reduction = chosen
        if self.reduction.needs_snapshots and switch_after // snapshot_every + 1 < 3:
            raise ValueError(f"warm-up too short: switch_after={switch_after} with snapshot_every={snapshot_every} "
                             f"gives {switch_after // snapshot_every + 1} snapshots, CMD needs at least 3")
        device, dtype = check_device("snapshot_device", snapshot_device), check_dtype("snapshot_dtype", snapshot_dtype)
        if snapshot_dir is not None and device.type != "cpu":
            raise ValueError(f"snapshot_dir keeps the snapshots in a file; snapshot_device={snapshot_device!r} "
                             "cannot apply (leave it at 'cpu')")
        self._setup = Setup(params, make_base, switch_after, snapshot_every, device, dtype,
                            None if snapshot_dir is None else str(snapshot_dir), ModeExchange(params.tracked),
                            record_snapshots=self.reduction.needs_snapshots, row_window=self.reduction.row_window,
                            sharding=Sharding(params.tracked) if all(sharded) else None)
        self.reduction.check(self._setup)
        if self._setup.sharding is not None and keep_decomposition:
            raise ValueError("keep_decomposition is not available with FSDP2-sharded parameters (each rank fits only "
                             "its own shard)")
        self.keep_decomposition = keep_decomposition
        self._phase: Phase = WarmupPhase(self._setup)
        self._constructing = True
        super().__init__(params.groups, self._phase.optimizer.defaults)
        self._constructing = False
        self.param_groups = params.groups  # the very list the stepping optimizer steps on
        self.steps_taken = 0
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
    def snapshot_every(self) -> int:
        return self._setup.snapshot_every

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer each step is delegated to: the base optimizer in the warm-up (and with
        :class:`Gradual`); after the switch the base optimizer class rebuilt on the low-rank cores
        (:class:`LowRank`) or the mode coefficients (:class:`Modes`), plus the parameters trained in full."""
        return self._phase.optimizer

    @property
    def embedding(self):
        """The :class:`~cmd_optim.optim.embedding.GradualEmbedding` after a :class:`Gradual` switch, else None."""
        return getattr(self._phase, "embedding", None)

    @property
    def sharding(self) -> Sharding | None:
        """Under FSDP2, where this rank's rows of the tracked parameters lie (``sharding.mesh``); else None."""
        return self._setup.sharding

    @property
    def mode_exchange(self) -> ModeExchange:
        """The object a communication hook uses (``cmd_optim.integrations.ddp.register_cmd_hook``)."""
        return self._setup.exchange

    @property
    def trainable_dims(self) -> int:
        """How many numbers the stepping optimizer updates per step now."""
        return self._phase.trainable_dims()

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the warm-up snapshots now (0 after the switch)."""
        snapshots = getattr(self._phase, "snapshots", None)
        return snapshots.nbytes if snapshots is not None else 0

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state ``step()`` uses now: in the warm-up the base optimizer's state and the
        snapshots; in the mode phase the map (5 bytes per parameter) and the mode optimizer's state; with
        the gradual reduction the base optimizer's state, the Decomposition and the embedding."""
        return self._phase.state_bytes()

    @property
    def limited_steps(self) -> int:
        """Mode-phase steps cut back by the speed limit."""
        return getattr(self._phase, "limited_steps", 0)

    @property
    def mode_coefficients(self) -> list[torch.Tensor]:
        """The trained coefficients of the mode phase, one vector per parameter group (empty otherwise)."""
        return list(getattr(self._phase, "coefficients", []))

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
        self._count(self._phase.step(loss, closure))
        return loss

    @torch.compiler.disable  # plain-Python bookkeeping, kept out of a compiled step's graph
    def _count(self, taken: bool) -> None:
        """Count a step (``taken``) or a skipped one; after a taken step the phase's bookkeeping and the switch."""
        if not taken:
            self.skipped_steps += 1
            return
        self.steps_taken += 1
        self._phase.after_step(self.steps_taken)
        if self._switch_due():
            self._switch()

    def _switch_due(self) -> bool:
        return not self._phase.reduced and self.steps_taken >= self._setup.switch_after

    @torch.compiler.disable
    def _switch(self) -> None:
        """Decompose the warm-up and build the reduced phase. Nothing changes unless every part succeeds,
        so a switch that raises leaves the warm-up intact (it can be saved, and the next step retries)."""
        warmup = self._phase
        snapshots = warmup.snapshots
        keep = self.keep_decomposition or isinstance(self.reduction, Gradual)
        d = None
        if snapshots is not None and self._setup.sharding is not None:
            d = self._setup.sharding.fit_slopes(snapshots.trajectory(), self.modes, self.samples, self.seed,
                                                measure=True)
        elif snapshots is not None:
            fit = decompose if keep else fit_slopes  # the mode map needs 5 bytes per parameter, not 24
            d = fit(snapshots.trajectory(), modes=self.modes, samples=self.samples, seed=self.seed,
                    layer_sizes=snapshots.layout.sizes, measure=True)
        if d is not None:
            if not bool((d.profiles.amax(dim=1) > d.profiles.amin(dim=1)).any()):
                raise RuntimeError(
                    f"the warm-up moved none of the sampled parameters in {self.steps_taken} steps (a learning "
                    "rate of 0, zero gradients, or step() without a backward?): there are no modes to train. "
                    "The optimizer stays in the warm-up and retries at the next step.")
            if self._setup.sharding is None and torch.distributed.is_available() and torch.distributed.is_initialized():
                check_rank_consistency(d)  # (sharded, the ranks agree by construction: shared samples)
        reduced = self.reduction.build(self._setup, warmup, d)
        report = {"step": self.steps_taken, "reduction": self.reduction.name,
                  "trainable_dims": reduced.trainable_dims()}
        if d is not None:
            total = d.num_params if self._setup.sharding is None else self._setup.sharding.num_global
            report.update({"modes": d.num_modes, "decomposed_params": total, "snapshots": d.num_snapshots,
                           "relative_error": float(d.fit_quality.relative_error.mean()),
                           "explained_variance": d.fit_quality.explained_variance})
        self.switch_report = report
        self._install(reduced)
        if snapshots is not None:
            snapshots.release()
        self.decomposition = d if keep and d is not None else None

    def _install(self, phase: Phase) -> None:
        """Make ``phase`` the live phase (nothing in here can fail)."""
        getattr(self._phase, "release", lambda: None)()
        self._phase = phase
        phase.adopt()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._setup.exchange.clear()
        for psi in self.mode_coefficients:
            psi.grad = None

    # ------------------------------------------------------------------ state
    @torch.compiler.disable
    def state_dict(self) -> dict:
        """torch's envelope of the stepping optimizer (``"state"``, ``"param_groups"``) plus ``"cmd"``.

        Tensors and plain Python values only (``torch.load(..., weights_only=True)`` reads it). In the
        warm-up ``"cmd"`` holds the snapshots taken so far, so that a resumed run decomposes the same
        trajectory; in the mode phase the map (5 bytes per parameter) and the coefficients.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        envelope = self._phase.optimizer.state_dict()
        envelope["cmd"] = {
            "version": _STATE_VERSION, "phase": self._phase.name, "reduction": self.reduction.name,
            "base": self._setup.make_base.optimizer_name, "switch_after": self._setup.switch_after,
            "snapshot_every": self._setup.snapshot_every, "tracked_numel": _tracked_numel(self._setup),
            "steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps,
            "visible_groups": [hyperparameters(group) for group in self.param_groups],
            "switch_report": self.switch_report, **self._phase.extra_state(),
        }
        if self.decomposition is not None and "decomposition" not in envelope["cmd"]:
            envelope["cmd"]["decomposition"] = self.decomposition.state_dict()
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
        if cmd["phase"] == WarmupPhase.name:
            phase = WarmupPhase.load(self._setup, state_dict, cmd, cmd["steps_taken"])
        else:
            phase = self.reduction.load(self._setup, state_dict, cmd)
        decomposition = Decomposition.from_state_dict(cmd["decomposition"]) if "decomposition" in cmd else None
        # commit: nothing below raises
        for visible, saved in zip(self.param_groups, cmd["visible_groups"]):
            visible.update(saved)
        self._install(phase)
        self.steps_taken, self.skipped_steps = cmd["steps_taken"], cmd["skipped_steps"]
        self.switch_report = cmd.get("switch_report")
        self.decomposition = getattr(phase, "decomposition", decomposition)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_envelope(self, state_dict: dict) -> dict:
        cmd = state_dict.get("cmd")
        if not isinstance(cmd, dict) or cmd.get("version") != _STATE_VERSION:
            raise ValueError("not a CMDOptimizer state_dict (no 'cmd' entry of this version); a plain torch.optim "
                             "state cannot be loaded into a CMDOptimizer")
        if cmd.get("phase") not in (WarmupPhase.name, Modes.name, Gradual.name, LowRank.name):
            raise ValueError(f"unknown CMDOptimizer phase {cmd.get('phase')!r} in the state_dict")
        if cmd["phase"] != WarmupPhase.name and cmd.get("reduction") != self.reduction.name:
            raise ValueError(f"state_dict was saved with reduction={cmd.get('reduction')!r}, this optimizer has "
                             f"reduction={self.reduction.name!r}")
        if cmd.get("base") != self._setup.make_base.optimizer_name:
            raise ValueError(f"state_dict was saved with base optimizer {cmd.get('base')}, this optimizer uses "
                             f"{self._setup.make_base.optimizer_name}")
        for key, ours in (("switch_after", self._setup.switch_after), ("snapshot_every", self._setup.snapshot_every),
                          ("tracked_numel", _tracked_numel(self._setup))):
            if cmd.get(key) != ours:
                raise ValueError(f"state_dict was saved with {key}={cmd.get(key)}, this optimizer has {key}={ours}")
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
        return (f"CMDOptimizer(phase={self.phase!r}, reduction={self.reduction!r}, modes={self.modes}, "
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


_REDUCTIONS = {"modes": Modes, "gradual": Gradual, "lowrank": LowRank}


def _reduction(reduction, max_coefficient, embed, embed_every, embed_fraction) -> Modes | Gradual | LowRank | None:
    """The reduction strategy, from its new form or the deprecated ``embed`` / ``max_coefficient`` arguments
    (None: the default, chosen once the parameters and the base are known)."""
    if embed is not None or embed_every is not None or embed_fraction is not None or max_coefficient is not None:
        if reduction not in (None, "modes"):
            raise TypeError("pass reduction= only (embed, embed_every, embed_fraction and max_coefficient are its "
                            "deprecated spellings)")
        warnings.warn("embed=, embed_every=, embed_fraction= and max_coefficient= are deprecated: use "
                      "reduction=Gradual(every, fraction) or reduction=Modes(max_slope=...)", FutureWarning,
                      stacklevel=3)
        if embed not in (None, "all", "gradual"):
            raise ValueError(f"embed must be 'all' or 'gradual', got {embed!r}")
        if embed == "gradual":
            return Gradual(every=2 if embed_every is None else embed_every,
                           fraction=0.1 if embed_fraction is None else embed_fraction)
        return Modes() if max_coefficient is None else Modes(max_slope=max_coefficient)
    if reduction is None or isinstance(reduction, tuple(_REDUCTIONS.values())):
        return reduction
    if isinstance(reduction, str) and reduction in _REDUCTIONS:
        return _REDUCTIONS[reduction]()
    raise ValueError(f"reduction must be one of {sorted(_REDUCTIONS)} or a Modes, Gradual or LowRank, "
                     f"got {reduction!r}")


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
