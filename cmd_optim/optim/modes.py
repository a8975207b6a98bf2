"""The mode reduction, the paper's method: after the switch only the mode coefficients are trained.

Each parameter group g has one coefficient per mode m. The base optimizer (rebuilt on the coefficients
plus the ``keep_free`` parameters) steps on the mode gradient ``sum_i u_i grad_i / sum_i u_i^2`` over the
group's members of the mode, reading its hyperparameters from the visible ``param_groups`` at every step;
every member then moves by ``u_i`` times its coefficient's change (:class:`cmd_optim.core.ModeMap`).

The speed limit: no coefficient changes per step by more than its mode's reference did at its fastest in
the warm-up (measured from the snapshots), where the warm-up with these hyperparameters was stable.
Where it cuts a step back, the coefficient is cut back with it (not with LBFGS, whose line search sets
the step length).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..core import MAX_SLOPE, Decomposition, ModeMap
from ..core._checks import check_real
from ..core.mode_map import KERNELS
from ._params import hyperparameters, tensor_bytes
from .decomposed import Decomposed
from .phase import NonFiniteStep, Setup, guarded_step
from .reduction import register
from .warmup import WarmupPhase, load_base_state

__all__ = ["ModePhase", "Modes"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _warn_still(setup: Setup, mode_map: ModeMap) -> None:
    """Warn about tracked parameters whose every slope is 0 (frozen or unmoved over the warm-up): the mode
    reduction can never move them."""
    still = [setup.params.names[p][0] for p, u in zip(setup.params.tracked, mode_map.slopes)
             if u.numel() and not bool(u.any())]
    if still:
        warnings.warn(f"{len(still)} parameters did not move during the warm-up ({', '.join(still[:5])}"
                      f"{', ...' if len(still) > 5 else ''}): the mode reduction gives them slope 0 and they will "
                      "not train after the switch, even if unfrozen; keep them free (keep_free=...) or use the "
                      "default reduction", RuntimeWarning, stacklevel=5)


@register
@dataclasses.dataclass(frozen=True)
class Modes(Decomposed):
    """The paper's reduction: ``CMDOptimizer(model, base, modes=10)`` or ``reduction=Modes(modes=10, ...)``.

    Args (besides the decomposition's, see :class:`~cmd_optim.optim.decomposed.Decomposed`):
        max_slope: the largest |u_i| (a parameter's slope in units of its mode's RMS slope).
        speed_limit: cap each coefficient's change per step at its reference's fastest warm-up speed.
        kernel: the mode map's kernels (:data:`cmd_optim.core.mode_map.KERNELS`; ``"auto"``: the fastest
            this installation has for the device).
        keep_decomposition: keep the switch's :class:`Decomposition` in ``CMDOptimizer.decomposition`` (24
            bytes per parameter); the mode phase itself needs 5.
    """

    max_slope: float = MAX_SLOPE
    speed_limit: bool = True
    kernel: str = "auto"
    keep_decomposition: bool = False

    name: ClassVar[str] = "modes"
    supports_sharding: ClassVar[bool] = True
    supports_lbfgs: ClassVar[bool] = True
    communication_hook: ClassVar[bool] = True
    shortcuts: ClassVar[tuple[str, ...]] = (*Decomposed.shortcuts, "keep_decomposition")
    state_keys: ClassVar[tuple[str, ...]] = ("map", "coefficients", "applied", "speed_limit", "limited_steps",
                                             "origins")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_slope", check_real("max_slope", self.max_slope, low=0, low_open=True))
        if not isinstance(self.speed_limit, bool):
            raise TypeError(f"speed_limit must be True or False, got {self.speed_limit!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if not isinstance(self.keep_decomposition, bool):
            raise TypeError(f"keep_decomposition must be True or False, got {self.keep_decomposition!r}")

    def check(self, setup: Setup) -> None:
        super().check(setup)
        if setup.sharding is not None and self.keep_decomposition:
            raise ValueError("keep_decomposition is not available with FSDP2-sharded parameters (each rank fits only "
                             "its own shard): drop it, or train with DistributedDataParallel, where every rank holds "
                             "the whole decomposition")

    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> ModePhase:
        """The mode phase at the switch: the map of the warm-up's fit (a :class:`SlopeFit` is taken over in
        place), coefficients at zero, SGD momentum projected."""
        d, _ = self.fit(setup, warmup.recorder, steps_taken, keep=self.keep_decomposition)
        params = setup.params
        fit = d.slope_fit() if isinstance(d, Decomposition) else d
        profiles = d.profiles
        report = self.report(d, setup)
        mode_map = ModeMap.from_fit(fit, setup.local_tracked(), params.tracked_groups, len(params.groups),
                                    self.max_slope, kernel=self.kernel, reduce=setup.shard_sum)
        _warn_still(setup, mode_map)
        if self.speed_limit:
            per_snapshot = profiles.diff(dim=1).abs().amax(dim=1).to(mode_map.device)
            speed = (per_snapshot * mode_map.mode_rms / self.snapshot_every)[mode_map.mode_of_coefficient()]
        else:
            speed = torch.full((mode_map.num_coefficients,), float("inf"), device=mode_map.device)
        zeros = torch.zeros(mode_map.num_coefficients, device=mode_map.device)
        phase = ModePhase(setup, mode_map, zeros, zeros.clone(), speed, fit_report=report,
                          decomposition=d if self.keep_decomposition else None)
        base_state = warmup.optimizer.state
        buffers = [setup.local(base_state.get(p, {}).get("momentum_buffer")) for p in params.tracked]
        if any(b is not None for b in buffers):  # SGD's momentum, projected like a gradient
            momentum = mode_map.from_sums(phase.reduce(mode_map.mode_sums(buffers)))
            for psi, piece in zip(phase.coefficients, momentum.split(_group_sizes(mode_map))):
                phase.optimizer.state[psi]["momentum_buffer"] = piece.clone()
        for p in params.free:  # parameters kept free carry their whole state over
            if p in base_state:
                phase.optimizer.state[p] = base_state[p]
        return phase

    def load(self, setup: Setup, envelope: dict, extra: dict) -> ModePhase:
        """A mode phase from saved state, built beside the live one (every entry checked first)."""
        required = ("map", "coefficients", "applied", "speed_limit", "limited_steps")
        missing = [key for key in required if key not in extra]
        if missing:
            raise ValueError(f"the mode-phase state_dict is missing {', '.join(missing)}")
        params = setup.params
        mode_map = ModeMap.from_state_dict(_local_map_state(extra["map"], setup), setup.local_tracked(),
                                           reduce=setup.shard_sum, kernel=self.kernel)
        if mode_map.num_groups != len(params.groups) or list(mode_map.groups) != list(params.tracked_groups):
            raise ValueError("the mode-phase state_dict's parameter groups do not match this optimizer's")
        vectors = {key: extra[key] for key in ("coefficients", "applied", "speed_limit")}
        for key, value in vectors.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (mode_map.num_coefficients,):
                raise ValueError(f"the mode-phase state_dict's {key!r} must be a ({mode_map.num_coefficients},) tensor")
        if not (torch.isfinite(vectors["coefficients"]).all() and torch.isfinite(vectors["applied"]).all()):
            raise ValueError("the mode-phase state_dict holds non-finite coefficients")
        if bool((vectors["speed_limit"].isnan() | (vectors["speed_limit"] < 0)).any()):
            raise ValueError("the mode-phase state_dict holds a negative or NaN speed limit")
        if not isinstance(extra["limited_steps"], int) or extra["limited_steps"] < 0:
            raise ValueError(f"the mode-phase state_dict's 'limited_steps' must be a non-negative integer, got "
                             f"{extra['limited_steps']!r}")
        origins = extra.get("origins", {})
        if not isinstance(origins, dict):
            raise ValueError("the mode-phase state_dict's 'origins' must be a dict")
        decomposition = Decomposition.from_state_dict(extra["decomposition"]) if "decomposition" in extra else None
        phase = ModePhase(setup, mode_map, *(v.to(mode_map.device) for v in vectors.values()),
                          origins=origins, limited_steps=extra["limited_steps"], fit_report=extra.get("fit", {}),
                          decomposition=decomposition)
        load_base_state(phase.optimizer, envelope)
        return phase


def _local_map_state(state: dict, setup: Setup) -> dict:
    """A saved map's per-parameter tensors as this rank's shards (they are saved as DTensors under FSDP2)."""
    if not isinstance(state, dict):
        raise ValueError("the mode-phase state_dict's 'map' must be a dict")
    return {**state, **{key: [setup.local(t) for t in state[key]] for key in ("slopes", "modes")
                        if isinstance(state.get(key), list)}}


def _group_sizes(mode_map: ModeMap) -> list[int]:
    return [s.stop - s.start for s in mode_map.group_slices()]


class ModePhase:
    """The reduced phase of :class:`Modes`: the base optimizer steps the mode coefficients.

    State: the map (5 bytes per mapped parameter), the coefficients, how much of them the parameters
    have followed (``applied``), the speed limit (C numbers each), the mode optimizer's state, and for
    float16/bfloat16 parameters their value at the switch (their moves are placed as
    ``origin + u * applied`` and rounded once; added step by step they would mostly round away).
    """

    name = "modes"
    reduced = True

    def __init__(self, setup: Setup, mode_map: ModeMap, coefficients: torch.Tensor, applied: torch.Tensor,
                 speed_limit: torch.Tensor, origins: dict | None = None, limited_steps: int = 0,
                 fit_report: dict | None = None, decomposition: Decomposition | None = None) -> None:
        self.setup, self.map = setup, mode_map
        self.fit_report = dict(fit_report or {})
        self.decomposition = decomposition
        self.params = setup.local_tracked()  # what the map moves: this rank's shards under FSDP2
        self.applied, self.speed_limit = applied.clone(), speed_limit.clone()
        self.limited_steps = limited_steps
        self.coefficients = [nn.Parameter(coefficients[s].clone()) for s in mode_map.group_slices()]
        free = set(setup.params.free)
        groups = [{**hyperparameters(visible), "params": [psi, *(p for p in visible["params"] if p in free)]}
                  for psi, visible in zip(self.coefficients, setup.params.groups)]
        self.optimizer = setup.make_base(groups)
        if isinstance(self.optimizer, torch.optim.LBFGS):
            # Its line search sets the step length; cutting the coefficients back behind its back would
            # corrupt its curvature history (weights turned NaN), so the speed limit does not apply.
            self.speed_limit.fill_(float("inf"))
        saved = origins if origins is not None else {}
        self.origins: list[torch.Tensor | None] = []
        for index, p in enumerate(self.params):
            if p.dtype not in _LOW_PRECISION:
                self.origins.append(None)
            elif origins is None:  # at the switch
                self.origins.append(p.detach().clone())
            elif isinstance(saved.get(index), torch.Tensor) and setup.local(saved[index]).shape == p.shape:
                self.origins.append(setup.local(saved[index]).to(p.device, p.dtype).clone())
            else:
                raise ValueError(f"the mode-phase state_dict has no switch value of the {p.dtype} parameter {index}")

    def adopt(self) -> None:
        self.setup.exchange.attach(self.map)

    def release(self) -> None:
        self.setup.exchange.attach(None)

    # ------------------------------------------------------------------ stepping
    def step(self, loss, closure: Callable | None) -> bool:
        if not self._load_mode_gradients():
            return False
        for inner, visible in zip(self.optimizer.param_groups, self.setup.params.groups):
            inner.update(hyperparameters(visible))

        def reevaluate():
            self._follow()
            value = closure()
            if not self._load_mode_gradients():
                raise NonFiniteStep
            return value

        watched = [p for group in self.optimizer.param_groups for p in group["params"]]
        applied = self.applied.clone()
        took = guarded_step(self.optimizer, loss, closure, watched, reevaluate, restore=self.params)
        if not took:
            self.applied = applied
            return False
        return self._follow()

    @torch.no_grad()
    def _load_mode_gradients(self) -> bool:
        """Project the parameter gradients into the coefficients' ``.grad``; False if one is not finite."""
        sums = self.setup.exchange.take()
        if sums is None:
            sums = self.reduce(self.map.mode_sums([self.setup.local(p.grad) for p in self.setup.params.tracked]))
        mode_grads = self.map.from_sums(sums)
        if not self.setup.all_finite([mode_grads, *(p.grad for p in self.setup.params.free)]):
            return False
        for psi, grad in zip(self.coefficients, mode_grads.split(_group_sizes(self.map))):
            psi.grad = grad
        return True

    @torch.no_grad()
    def _follow(self) -> bool:
        """Move the mapped parameters by the coefficients' change since they last followed, capped at the
        speed limit; a non-finite change is refused (coefficients set back, weights untouched)."""
        current = torch.cat([psi.detach().reshape(-1) for psi in self.coefficients])
        delta = current - self.applied
        limited = torch.clamp(delta, -self.speed_limit, self.speed_limit)
        finite, cut = torch.stack([torch.isfinite(delta).all(), (limited != delta).any()]).tolist()
        if not finite or cut:
            if finite:
                self.limited_steps += 1
            else:
                limited = torch.zeros_like(delta)
            for psi, row in zip(self.coefficients, (self.applied + limited).split(_group_sizes(self.map))):
                psi.copy_(row)
        self.applied += limited
        moving = [q if p.grad is not None else None for p, q in zip(self.setup.params.tracked, self.params)]
        self.map.lift_([p if o is None else None for p, o in zip(moving, self.origins)], limited)
        if any(o is not None for o in self.origins):
            self.map.place_([p if o is not None else None for p, o in zip(moving, self.origins)], self.origins,
                            self.applied)
        return bool(finite)

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Mode sums of this rank's shards added over the ranks (FSDP2); as they are otherwise."""
        if self.setup.shard_sum is not None:
            self.setup.shard_sum([sums])
        return sums

    def after_step(self, steps_taken: int) -> None:
        pass

    # ------------------------------------------------------------------ accounting and state
    def trainable_dims(self) -> int:
        free = sum(p.numel() for p in self.setup.params.free if p.requires_grad)
        return free + int(self.map.active.sum())

    def state_bytes(self) -> int:
        mapped = tensor_bytes(self.map.slopes) + sum(p.numel() for p in self.map.slopes)  # + one byte of bin each
        return mapped + tensor_bytes(self.optimizer.state) + tensor_bytes(self.origins)

    def extra_state(self) -> dict:
        """Under FSDP2 the per-parameter tensors are this rank's shards of DTensors (what
        torch.distributed.checkpoint saves shard by shard); everything else is the same on every rank."""
        mode_map = self.map.state_dict()
        sharding = self.setup.sharding
        if sharding is not None:
            for key in ("slopes", "modes"):
                mode_map[key] = [sharding.global_view(t, i) for i, t in enumerate(mode_map[key])]
        origins = {i: o.clone() for i, o in enumerate(self.origins) if o is not None}
        if sharding is not None:
            origins = {i: sharding.global_view(o, i) for i, o in origins.items()}
        state = {
            "map": mode_map,
            "coefficients": torch.cat([psi.detach().reshape(-1) for psi in self.coefficients]).clone(),
            "applied": self.applied.clone(),
            "speed_limit": self.speed_limit.clone(),
            "limited_steps": self.limited_steps,
            "origins": origins,
            "fit": dict(self.fit_report),
        }
        if self.decomposition is not None:
            state["decomposition"] = self.decomposition.state_dict()
        return state

    def report(self) -> dict:
        return {**self.fit_report, "coefficients": self.map.num_coefficients}
