"""CMDOptimizer: a warm-up with any torch.optim optimizer, then training through the CMD modes only."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .decomposition import Decomposition, decompose
from .embedding import GradualEmbedding
from .projection import MAX_COEFFICIENT, ModeProjection
from .snapshots import SnapshotBuffer

_PHASES = ("warmup", "reduced")
_EMBED = ("all", "gradual")


class CMDOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; after ``warmup_steps`` it trains only the CMD mode coefficients.

    Args:
        model: an ``nn.Module``, or an iterable of parameters, of ``(name, parameter)`` pairs, or of
            parameter-group dicts (whose ``"params"`` hold either). Parameters with
            ``requires_grad=False`` are left out; a parameter listed twice (tied weights) counts once.
        base: a ``torch.optim.Optimizer`` subclass, or a callable ``param_groups -> Optimizer``.
        modes: the most CMD modes (M); the decomposition may find fewer.
        warmup_steps: optimizer steps of ordinary training before the switch.
        snapshot_every: a snapshot of the parameters is taken every this many steps (and at step 0).
        samples: how many parameter trajectories the clustering sees (K).
        seed: seeds the sampling of the decomposition.
        keep_free: ``fnmatch`` patterns of parameter names (e.g. ``"classifier.*"``) that keep ordinary
            training with the base optimizer after the switch.
        snapshot_device, snapshot_dtype: where and how the warm-up snapshots are kept. They take
            ``(warmup_steps // snapshot_every + 1) * N * itemsize`` bytes, freed at the switch.
        max_coefficient: the largest |a_i| a parameter keeps, relative to its mode's RMS slope.
        embed: ``"all"`` (after the warm-up only the mode coefficients train) or ``"gradual"`` (the
            paper's embedded CMD: the base optimizer keeps training, and every ``embed_every`` snapshots
            the ``embed_fraction`` of the remaining parameters whose fit drifted least are tied to their
            mode's reference; see :class:`cmd_optim.embedding.GradualEmbedding`).
        embed_every, embed_fraction: L and P of ``embed="gradual"``.
        **base_kwargs: passed to ``base`` (``lr``, ``momentum``, ``betas``, ...).

    After the switch, mode ``m`` of parameter group ``g`` has one coefficient ``psi[g, m]``. Its
    gradient is ``sum_i u_i grad_i / sum_i u_i^2`` over the group's members of the mode (the
    least-squares projection of the full gradient onto the mode's direction), the base optimizer steps
    on ``psi`` with the hyperparameters read from ``param_groups`` at every step, and every member moves
    by ``u_i`` times its coefficient's change. See docs/optimizer.md for the safeguards and the state.
    With ``embed="gradual"`` the base optimizer stays in charge and the embedded parameters are moved
    onto their modes after each of its steps.
    """

    def __init__(
        self,
        model: nn.Module | Iterable,
        base: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        modes: int = 10,
        warmup_steps: int = 300,
        snapshot_every: int = 10,
        samples: int = 1000,
        seed: int = 0,
        keep_free: Iterable[str] = (),
        snapshot_device: torch.device | str = "cpu",
        snapshot_dtype: torch.dtype = torch.float32,
        max_coefficient: float = MAX_COEFFICIENT,
        embed: str = "all",
        embed_every: int = 2,
        embed_fraction: float = 0.1,
        **base_kwargs,
    ) -> None:
        for name, value, low in (("modes", modes, 1), ("warmup_steps", warmup_steps, 1),
                                 ("snapshot_every", snapshot_every, 1), ("samples", samples, modes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if modes > 256:
            raise ValueError(f"modes must be at most 256, got {modes}")
        if embed not in _EMBED:
            raise ValueError(f"embed must be one of {_EMBED}, got {embed!r}")
        if isinstance(embed_every, bool) or not isinstance(embed_every, int) or embed_every < 1:
            raise ValueError(f"embed_every must be an integer >= 1, got {embed_every!r}")
        if not 0 < embed_fraction <= 1:
            raise ValueError(f"embed_fraction must be in (0, 1], got {embed_fraction!r}")
        num_snapshots = warmup_steps // snapshot_every + 1
        if num_snapshots < 3:
            raise ValueError(
                f"warm-up too short: warmup_steps={warmup_steps} with snapshot_every={snapshot_every} gives "
                f"{num_snapshots} snapshots, CMD needs at least 3"
            )
        groups, names = _named_param_groups(model)
        _refuse_sharding(model, names, base)
        patterns = list(keep_free)
        self._base_factory = _base_factory(base, base_kwargs)
        self.base = self._base_factory([dict(g) for g in groups])
        self._constructed = False
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._constructed = True

        self.modes, self.samples, self.seed = modes, samples, seed
        self.warmup_steps, self.snapshot_every = warmup_steps, snapshot_every
        self.max_coefficient = max_coefficient
        self.embed, self.embed_every, self.embed_fraction = embed, embed_every, embed_fraction
        self._tracked, self._tracked_groups, self._free = [], [], []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if any(fnmatch.fnmatchcase(names[p], pattern) for pattern in patterns):
                    self._free.append(p)
                else:
                    self._tracked.append(p)
                    self._tracked_groups.append(index)
        if not self._tracked:
            raise ValueError(f"keep_free={patterns} matches every parameter: nothing is left to decompose")
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names.values()):
                raise ValueError(
                    f"keep_free pattern {pattern!r} matches no parameter name (names look like "
                    f"{next(iter(names.values()))!r}); pass the model or named parameters to name them"
                )
        self._snapshot_spec = (num_snapshots, snapshot_device, snapshot_dtype)
        self._snapshots = SnapshotBuffer(self._tracked, *self._snapshot_spec)
        self._snapshots.record()
        self._phase = "warmup"
        self.steps_taken = 0
        self.skipped_steps = 0
        self.decomposition: Decomposition | None = None
        self._projection: ModeProjection | None = None
        self._psi: list[torch.Tensor] = []
        self._applied: torch.Tensor | None = None
        self.speed_limit: torch.Tensor | None = None
        self.limited_steps = 0
        self.embedding: GradualEmbedding | None = None
        self.switch_report: dict | None = None
        self._pending_mode_sums: dict[int, torch.Tensor] = {}  # from the DDP hook, by bucket
        self._hooked = False  # set by cmd_optim.distributed.register_cmd_hook

    # ------------------------------------------------------------------ public view
    @property
    def phase(self) -> str:
        """``"warmup"`` until ``warmup_steps`` optimizer steps were taken, then ``"reduced"``."""
        return self._phase

    @property
    def trainable_dims(self) -> int:
        """How many numbers the base optimizer updates per step now."""
        free = sum(p.numel() for p in self._free)
        if self._phase == "warmup":
            return free + sum(p.numel() for p in self._tracked)
        if self.embedding is not None:
            return free + self.embedding.decomposition.num_params - self.embedding.num_embedded
        return free + int(self._projection.active.sum())

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the warm-up snapshots now (0 after the switch)."""
        return self._snapshots.nbytes

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state used by ``step()`` now: warm-up, the base optimizer's state and the
        snapshots; reduced phase, the projection (5 bytes per parameter) and the mode optimizer's state,
        or with ``embed="gradual"`` the base optimizer's state, the Decomposition and the embedding.
        With ``embed="all"`` the Decomposition kept for inspection (``self.decomposition``) is not counted."""
        if self._phase == "warmup":
            return _tensor_bytes(self.base.state) + self.snapshot_bytes
        if self.embedding is not None:
            return (_tensor_bytes(self.base.state) + _tensor_bytes(self.decomposition.state_dict())
                    + _tensor_bytes(self.embedding.state_dict()))
        projection = self._projection.coefficients + self._projection.bins
        return _tensor_bytes(projection) + _tensor_bytes(self._inner.state)

    def add_param_group(self, param_group: dict) -> None:
        if self._constructed:
            raise NotImplementedError("CMDOptimizer cannot take new parameter groups after construction")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One optimizer step; a step whose gradients are not all finite is skipped and counted."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.base is not None:
            return self._base_step(loss, closure)
        return self._reduced_step(loss, closure)

    def _base_step(self, loss, closure):
        """A step of the base optimizer: the warm-up, or the reduced phase of ``embed="gradual"``."""
        if not _all_finite(p.grad for group in self.param_groups for p in group["params"]):
            self.skipped_steps += 1
            return loss
        self.base.step(_replaying(loss, closure))
        if self.embedding is not None:
            self.embedding.follow()
        self.steps_taken += 1
        if self.steps_taken % self.snapshot_every == 0:
            if self.embedding is not None:
                self.embedding.observe()
            else:
                self._snapshots.record()
        if self.steps_taken == self.warmup_steps:
            self._switch()
        return loss

    def _reduced_step(self, loss, closure):
        if not self._load_mode_gradients():
            self.skipped_steps += 1
            return loss
        for inner, visible in zip(self._inner.param_groups, self.param_groups):
            inner.update({key: value for key, value in visible.items() if key != "params"})

        def reevaluate():
            self._sync_parameters()
            with torch.enable_grad():
                value = closure()
            self._load_mode_gradients()
            return value

        self._inner.step(_replaying(loss, reevaluate if closure is not None else None))
        self._sync_parameters()
        self.steps_taken += 1
        return loss

    def _add_mode_sums(self, key: int, sums: torch.Tensor) -> None:
        """Mode-gradient numerators already averaged over the ranks (cmd_optim.distributed), by bucket."""
        self._pending_mode_sums[key] = sums

    @torch.no_grad()
    def _load_mode_gradients(self) -> bool:
        """Project the parameter gradients into ``psi.grad``; False if any gradient is non-finite.

        Under the DDP hook the projection arrived with the all-reduce; it is summed in bucket order,
        so that every rank adds in the same order.
        """
        if self._pending_mode_sums:
            sums = sum(self._pending_mode_sums[key].double() for key in sorted(self._pending_mode_sums))
            self._pending_mode_sums = {}
            mode_grads = self._projection.from_sums(sums)
        elif self._hooked:  # projecting this rank's local gradients would let the ranks drift apart
            raise RuntimeError(
                "CMDOptimizer.step() found no mode gradient from the DDP hook: the last backward did not "
                "synchronise (inside ddp.no_sync(), or not through the DDP-wrapped model)")
        else:
            mode_grads = self._projection.project([p.grad for p in self._tracked])
        if not _all_finite([mode_grads, *(p.grad for p in self._free)]):
            return False
        for psi, grad in zip(self._psi, mode_grads):
            psi.grad = grad
        return True

    @torch.no_grad()
    def _sync_parameters(self) -> None:
        """Move the tracked parameters by the change of ``psi`` since they last followed it.

        The change is capped at the speed limit: no mode moves faster per step than it did during
        the warm-up (where ``psi`` is cut back, the base optimizer's view is cut back with it).
        """
        current = torch.stack([psi.detach() for psi in self._psi])
        delta = current - self._applied
        limited = torch.clamp(delta, -self.speed_limit, self.speed_limit)
        if not torch.equal(limited, delta):
            self.limited_steps += 1
            for psi, row in zip(self._psi, self._applied + limited):
                psi.copy_(row)
        self._projection.apply(self._tracked, limited)
        self._applied = self._applied + limited

    # ------------------------------------------------------------------ the switch
    def _switch(self) -> None:
        trajectory = self._snapshots.trajectory()
        d = self.decomposition = decompose(
            trajectory, modes=self.modes, samples=self.samples, seed=self.seed, layer_sizes=self._snapshots.sizes,
        )
        self.switch_report = {
            "step": self.steps_taken, "modes": d.num_modes, "decomposed_params": d.num_params,
            "snapshots": d.num_snapshots, "relative_error": float(d.relative_error(trajectory).mean()),
            "explained_variance": d.explained_variance(trajectory),
        }
        self._snapshots.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from .distributed import check_rank_consistency  # a module that imports this one
            check_rank_consistency(d)
        self._phase = "reduced"
        if self.embed == "gradual":
            self.embedding = GradualEmbedding(self.decomposition, self._tracked, self.embed_every, self.embed_fraction)
            return
        self._projection = ModeProjection.from_decomposition(
            self.decomposition, self._tracked, self._tracked_groups, len(self.param_groups), self.max_coefficient
        )
        self.speed_limit = self._projection.warmup_speed(self.decomposition, self.snapshot_every)
        momentum = self._projected_momentum()
        base_state = self.base.state
        self._build_mode_optimizer(torch.zeros(len(self.param_groups), self.decomposition.num_modes))
        for p in self._free:  # parameters kept free carry their whole state over
            if p in base_state:
                self._inner.state[p] = base_state[p]
        if momentum is not None:
            for psi, buffer in zip(self._psi, momentum):
                self._inner.state[psi]["momentum_buffer"] = buffer.clone()
        self.base = None  # the full-size state (momentum, second moments) is freed here

    def _projected_momentum(self) -> torch.Tensor | None:
        """SGD's momentum buffers, projected like gradients; None where the base keeps no such buffer."""
        buffers = [self.base.state.get(p, {}).get("momentum_buffer") for p in self._tracked]
        if any(b is None for b in buffers):
            return None
        return self._projection.project(buffers)

    def _build_mode_optimizer(self, psi: torch.Tensor) -> None:
        device = self._projection.device
        self._psi = [nn.Parameter(row.clone().to(device)) for row in psi]
        self._applied = torch.stack([p.detach() for p in self._psi]).clone()
        groups = []
        for index, (psi_row, visible) in enumerate(zip(self._psi, self.param_groups)):
            free = [p for p in visible["params"] if any(p is q for q in self._free)]
            groups.append({**{k: v for k, v in visible.items() if k != "params"}, "params": [psi_row, *free]})
        self._inner = self._base_factory(groups)
        self.state = self._inner.state

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain Python values only (``torch.load(..., weights_only=True)`` reads it).

        In the warm-up it holds the snapshots taken so far, so that a resumed run decomposes the same
        trajectory; in the reduced phase, 5 bytes per parameter for the projection plus the
        decomposition (on its device, 24 bytes per parameter).
        """
        state = {
            "phase": self._phase,
            "embed": self.embed,
            "steps_taken": self.steps_taken,
            "skipped_steps": self.skipped_steps,
            "limited_steps": self.limited_steps,
            "switch_report": self.switch_report,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }
        if self._phase == "warmup":
            state["base"] = self.base.state_dict()
            state["snapshots"] = self._snapshots.trajectory().clone()
        elif self.embedding is not None:
            state["base"] = self.base.state_dict()
            state["decomposition"] = self.decomposition.state_dict()
            state["embedding"] = self.embedding.state_dict()
        else:
            state["mode_optimizer"] = self._inner.state_dict()
            state["psi"] = torch.stack([psi.detach() for psi in self._psi]).clone()
            state["applied"] = self._applied.clone()
            state["speed_limit"] = self.speed_limit.clone()
            state["projection"] = self._projection.state_dict()
            state["decomposition"] = self.decomposition.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        phase = state_dict.get("phase")
        if phase not in _PHASES:
            raise ValueError(f"not a CMDOptimizer state_dict: 'phase' is {phase!r}, expected one of {_PHASES}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        if state_dict.get("embed", "all") != self.embed:
            raise ValueError(f"state_dict was saved with embed={state_dict['embed']!r}, this optimizer has embed={self.embed!r}")
        if self._phase != "warmup":
            self._restart_warmup()
        for group, saved in zip(self.param_groups, saved_groups):
            group.update(saved)
        self.steps_taken = state_dict["steps_taken"]
        self.skipped_steps = state_dict["skipped_steps"]
        self.limited_steps = state_dict["limited_steps"]
        self.switch_report = state_dict.get("switch_report")
        if phase == "warmup":
            self.base.load_state_dict(state_dict["base"])
            snapshots = state_dict["snapshots"]
            if snapshots.shape[1] != self._snapshots.data.shape[1]:
                raise ValueError(
                    f"state_dict snapshots cover {snapshots.shape[1]} parameters, this optimizer tracks "
                    f"{self._snapshots.data.shape[1]}"
                )
            self._snapshots.data[: len(snapshots)] = snapshots
            self._snapshots.count = len(snapshots)
            return
        self.decomposition = Decomposition.from_state_dict(state_dict["decomposition"])
        self._snapshots.release()
        self._phase = "reduced"
        if "embedding" in state_dict:
            self.base.load_state_dict(state_dict["base"])
            self.embedding = GradualEmbedding(self.decomposition, self._tracked, self.embed_every, self.embed_fraction)
            self.embedding.load_state_dict(state_dict["embedding"])
            return
        self._projection = ModeProjection.from_state_dict(state_dict["projection"], self._tracked)
        self._build_mode_optimizer(state_dict["psi"])
        self._applied = state_dict["applied"].to(self._applied.device).clone()
        self.speed_limit = state_dict["speed_limit"].to(self._applied.device).clone()
        self._inner.load_state_dict(state_dict["mode_optimizer"])
        for inner, visible in zip(self._inner.param_groups, self.param_groups):
            inner.update({key: value for key, value in visible.items() if key != "params"})
        self.base = None

    def _restart_warmup(self) -> None:
        """Back to the condition of a freshly built optimizer, so that any state_dict can be loaded."""
        if self.base is None:
            self.base = self._base_factory([dict(group) for group in self.param_groups])
            self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._snapshots = SnapshotBuffer(self._tracked, *self._snapshot_spec)
        self._phase = "warmup"
        self.decomposition = self._projection = self.speed_limit = self.embedding = None
        self._psi = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._pending_mode_sums = {}
        for psi in self._psi:
            psi.grad = None

    def __repr__(self) -> str:
        inner = self.base if self.base is not None else self._inner
        return (f"CMDOptimizer(phase={self._phase!r}, embed={self.embed!r}, modes={self.modes}, warmup_steps={self.warmup_steps}, "
                f"trainable_dims={self.trainable_dims}, base={type(inner).__name__})")


def find_cmd_optimizer(optimizer) -> CMDOptimizer | None:
    """The CMDOptimizer inside ``optimizer`` (unwrapping wrappers such as accelerate's), or None."""
    while optimizer is not None and not isinstance(optimizer, CMDOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _refuse_sharding(model, params, base) -> None:
    """FSDP and ZeroRedundancyOptimizer give ranks different parameters; CMD needs them identical."""
    advice = "use DistributedDataParallel (with cmd_optim.distributed.register_cmd_hook) instead"
    if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
            getattr(p, "_is_flat_param", False) or type(p).__name__ == "DTensor" for p in params):
        raise TypeError(f"CMDOptimizer does not support FSDP-sharded parameters: {advice}")
    if isinstance(base, type) and base.__name__ == "ZeroRedundancyOptimizer":
        raise TypeError(f"CMDOptimizer does not support base=ZeroRedundancyOptimizer: {advice}")


def _named_param_groups(model) -> tuple[list[dict], dict]:
    """Parameter groups (trainable, each parameter once) and a name for every parameter."""
    if isinstance(model, nn.Module):
        entries = [{"params": list(model.named_parameters())}]
    else:
        entries = list(model)
        if not entries or not isinstance(entries[0], dict):
            entries = [{"params": entries}]
    names, seen, groups = {}, set(), []
    for index, entry in enumerate(entries):
        params = []
        for position, item in enumerate(entry["params"]):
            name, p = item if isinstance(item, tuple) else (f"group{index}.param{position}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            if not p.requires_grad or p in seen:
                continue
            if not p.is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters can be trained")
            seen.add(p)
            names[p] = name
            params.append(p)
        if params:
            groups.append({**{k: v for k, v in entry.items() if k != "params"}, "params": params})
    if not groups:
        raise ValueError("CMDOptimizer got an empty parameter list (no parameter requires grad)")
    return groups, names


def _base_factory(base, base_kwargs) -> Callable[[list], torch.optim.Optimizer]:
    if isinstance(base, type) and not issubclass(base, torch.optim.Optimizer):
        raise TypeError(f"base must be a torch.optim.Optimizer subclass or a callable returning one, got {base!r}")
    if not callable(base):
        raise TypeError(f"base must be a torch.optim.Optimizer subclass or a callable returning one, got {base!r}")

    def make(groups):
        optimizer = base(groups, **base_kwargs)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"base returned a {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer

    return make


def _replaying(loss, closure):
    """A closure whose first call returns the loss already computed, and later calls re-evaluate."""
    if closure is None:
        return None
    pending = [loss]

    def replay():
        return pending.pop() if pending else closure()

    return replay


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state ``optimizer.step()`` uses: ``CMDOptimizer.state_bytes``, or for any other
    optimizer the tensors of its per-parameter state (AdamW: 8 bytes per float32 parameter, plus step counts)."""
    if isinstance(optimizer, CMDOptimizer):
        return optimizer.state_bytes
    return _tensor_bytes(optimizer.state)


def _tensor_bytes(tree) -> int:
    """Total bytes of the tensors in nested dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _all_finite(tensors) -> bool:
    tensors = [t for t in tensors if t is not None]
    if len(tensors) <= 1:
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    checks = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())
