"""The low-rank reduction, the default: after the switch the base optimizer keeps its state only inside a
refreshed one-sided subspace of each weight matrix.

Every matrix-shaped parameter W (m x n; a conv kernel is viewed as (out, in * kernel)) gets an orthonormal
basis P of r directions of its shorter side (:class:`cmd_optim.core.SubspaceMap`). The base optimizer
steps a *core* (r x n or m x r) whose gradient is the projected gradient, so its moments cost r / min(m, n)
of theirs in full; W moves by the lifted core step plus the gradient's residual outside the subspace, scaled
line by line as the base scaled the projected gradient (with plain SGD this is exactly SGD), the whole move
times ``min(step_scale, initial_lr / lr)`` (at least 1: the base's step at a constant rate, up to ``step_scale``
times it as a schedule decays, never at a rate above the schedule's peak). Every
``refresh_every`` steps P becomes the top-r singular directions of that step's gradient and the base's
state is rotated into the new basis. Biases, norm weights, the ``keep_free`` parameters and matrices whose
shorter side is at most ``min_side`` train in full with the base optimizer.

Ranks come from a budget in bytes: a projected matrix's state (its basis and the base's moments on the core)
is at most ``state_share`` of what the base keeps for it in full (AdamW: 8 bytes per parameter; SGD with
momentum: 4). The warm-up is plain training; it records nothing for this reduction (:class:`SwitchGradients`).

Requirements: the base's step must not depend on the parameter's value apart from weight decay (true for
torch.optim's SGD, Adam, AdamW, RMSprop, Adagrad, ...): the cores sit at zero and weight decay is applied
to W itself, decoupled or added to the gradient as the base does it.

Under FSDP2 (row shards) each rank steps its rows: a right core (m x r) is sharded by the same rows (a
DTensor, stepped where it lies); a left core (r x n) is whole on every rank, its projection the sum of the
ranks' shares (one all-reduce of the left cores per step). The residual's cap needs two norms per right
matrix (one all-reduce for all), and a refresh all-gathers one matrix's gradient at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import warnings
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

from ..core import SubspaceMap
from ..core._checks import check_int, check_real
from ..core.subspace import KERNELS
from ._dist_checks import agree_with_first_rank, replica_threads, world_size
from ._params import hyperparameters, tensor_bytes
from .phase import Setup, guarded_step
from .reduction import Reduction, register
from .sharding import is_sharded
from .warmup import WarmupPhase, WarmupRecorder, load_base_state

__all__ = ["LowRank", "LowRankPhase", "MatrixPlan", "plan_matrices", "spread_by_spectrum"]

#: Optimizer-state entries carried into (and rotated with) the core: first moments move linearly, second
#: moments through the squared rotation.
FIRST_MOMENTS = ("momentum_buffer", "exp_avg", "grad_avg")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
#: A projected matrix whose rank is below this is reported as starved.
USEFUL_RANK = 4


@dataclasses.dataclass(frozen=True)
class MatrixPlan:
    """What the low-rank phase does with one tracked matrix: ``rank`` 0 means it trains in full."""

    name: str
    shape: tuple[int, int]
    rank: int
    state_tensors: int  # how many tensors of the parameter's size the base keeps per parameter

    @property
    def projected(self) -> bool:
        return self.rank > 0

    def state_bytes(self) -> int:
        """Bytes of state for this matrix in the reduced phase (float32)."""
        m, n = self.shape
        if not self.projected:
            return 4 * self.state_tensors * m * n
        return 4 * self.rank * (min(m, n) + self.state_tensors * max(m, n))


def plan_matrices(names: list[str], shapes: list[tuple[int, int]], state_tensors: list[int], state_share: float,
                  rank: int | None, min_side: int) -> list[MatrixPlan]:
    """Each matrix's rank: the largest r whose state ``4 r (d + s D)`` bytes is at most ``state_share`` of the
    base's ``4 s m n`` (s state tensors per parameter), or the fixed ``rank``; capped at the shorter side d.
    Rank 0 (trained in full): d <= ``min_side``, a rank that would reach d, or, without a fixed rank, a base
    that keeps no state for the matrix (plain SGD: there is nothing to save)."""
    plans = []
    for name, (m, n), s in zip(names, shapes, state_tensors):
        d, wide = min(m, n), max(m, n)
        if rank is not None:
            r = min(rank, d)
        elif s:
            r = max(1, min(int(state_share * s * m * n // (d + s * wide)), d))
        else:
            r = d
        plans.append(MatrixPlan(name, (m, n), 0 if d <= min_side or r >= d else r, s))
    return plans


def spread_by_spectrum(plans: list[MatrixPlan], spectra: list[torch.Tensor | None]) -> list[MatrixPlan]:
    """The same total state as ``plans``, its ranks re-dealt across the projected matrices by their spectra
    (each matrix's singular values, e.g. of its first moment): one direction at a time, to the matrix whose
    next direction holds the largest share of its energy per byte of state, each at least rank 1 and below
    its shorter side. Matrices trained in full, and those without a spectrum, keep their plan."""
    budget = sum(plan.state_bytes() for plan, sv in zip(plans, spectra) if plan.projected and sv is not None)
    ranks, costs, shares, heap = {}, {}, {}, []

    def offer(index: int) -> None:  # the matrix's next direction, if it has one below its shorter side
        r = ranks[index]
        if r < len(shares[index]) and r + 1 < min(plans[index].shape):
            heapq.heappush(heap, (-shares[index][r] / costs[index], index))

    for index, (plan, sv) in enumerate(zip(plans, spectra)):
        if not plan.projected or sv is None:
            continue
        energy = sv.double().square()
        m, n = plan.shape
        shares[index] = (energy / energy.sum().clamp_min(1e-300)).tolist()
        costs[index] = 4 * (min(m, n) + plan.state_tensors * max(m, n))  # the state of one direction
        ranks[index] = 1
        budget -= costs[index]
        offer(index)
    while heap:
        _, index = heapq.heappop(heap)
        if costs[index] <= budget:
            ranks[index] += 1
            budget -= costs[index]
            offer(index)
    return [dataclasses.replace(plan, rank=ranks.get(index, plan.rank)) for index, plan in enumerate(plans)]


@register
@dataclasses.dataclass(frozen=True)
class LowRank(Reduction):
    """``CMDOptimizer(..., reduction=LowRank(...))``: the default reduction.

    Args:
        state_share: a projected matrix's optimizer state as a share of what the base keeps for it in full
            (sets each rank; see :func:`plan_matrices`).
        rank: one fixed rank for every matrix instead (capped at its shorter side); None: from ``state_share``.
        refresh_every: reduced steps between two refreshes of the bases.
        residual: also step the gradient's part outside the subspace (scaled as the base scaled the inside).
        min_side: matrices whose shorter side is at most this train in full (classifier heads, small layers).
        seed: seeds the refreshes' random test matrices.
        kernel: the step's kernels (:data:`cmd_optim.core.subspace.KERNELS`).
        allocate: ``"share"`` (each matrix gets ``state_share`` of its own state) or ``"spectrum"`` (the same
            total re-dealt by the spectra of the base's first moments at the switch, :func:`spread_by_spectrum`;
            a research setting).
        step_scale: each projected matrix moves up to this many times the step the base took on its core (and
            its residual); the parameters trained in full and weight decay keep the base's rate.
        peak_cap: the scaled rate stays at or below the schedule's peak: the gain is ``min(step_scale,
            initial_lr / lr)``, at least 1 (``initial_lr``: the rate torch's LR schedulers record at the start).
            At the peak rate, at a constant one, or with no scheduler, the step is the base's; on a decaying
            schedule it grows as the rate falls. False: always ``step_scale`` (a research setting).
    """

    state_share: float = 0.25
    rank: int | None = None
    refresh_every: int = 100
    residual: bool = True
    min_side: int = 16
    seed: int = 0
    kernel: str = "auto"
    allocate: str = "share"
    step_scale: float = 4.0
    peak_cap: bool = True

    name: ClassVar[str] = "lowrank"
    supports_sharding: ClassVar[bool] = True
    communication_hook: ClassVar[bool] = True
    shortcuts: ClassVar[tuple[str, ...]] = ("seed",)
    state_keys: ClassVar[tuple[str, ...]] = ("ranks", "bases", "window_steps", "refreshes")

    def __post_init__(self) -> None:
        self._set("state_share", check_real("state_share", self.state_share, low=0, high=1, low_open=True))
        if self.rank is not None:
            self._set("rank", check_int("rank", self.rank, low=1))
        self._set("refresh_every", check_int("refresh_every", self.refresh_every, low=1))
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        self._set("min_side", check_int("min_side", self.min_side, low=0))
        self._set("seed", check_int("seed", self.seed, low=0, high=2**63 - 1))
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        self._set("step_scale", check_real("step_scale", self.step_scale, low=0, low_open=True))
        if not isinstance(self.peak_cap, bool):
            raise TypeError(f"peak_cap must be True or False, got {self.peak_cap!r}")
        if self.allocate not in ("share", "spectrum"):
            raise ValueError(f"allocate must be 'share' or 'spectrum', got {self.allocate!r}")
        if self.allocate == "spectrum" and self.rank is not None:
            raise ValueError("allocate='spectrum' re-deals the state_share budget; with a fixed rank= there is none")

    def warmup_recorder(self, setup: Setup, saved: dict | None = None) -> SwitchGradients:
        return SwitchGradients(setup, saved)

    def plan(self, setup: Setup, base_state: dict, gradients: dict) -> list[MatrixPlan]:
        """The plan of every tracked matrix, from the base's state and the gradients at the switch."""
        matrices = setup.tracked_matrices
        names = [setup.params.names[p][0] for p in matrices]
        counts = [sum(1 for v in base_state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.numel() ==
                      p.numel()) for p in matrices]
        plans = plan_matrices(names, [_matrix_shape(p) for p in matrices], counts, self.state_share, self.rank,
                              self.min_side)
        if self.allocate == "share":
            return plans
        spectra = []
        for p, plan in zip(matrices, plans):
            source = _direction_source(p, base_state, gradients)
            spectra.append(torch.linalg.svdvals(_whole_tensor(source).detach().float().reshape(_matrix_shape(p)))
                           if plan.projected and source is not None else None)
        return spread_by_spectrum(plans, spectra)

    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> LowRankPhase:
        """The phase at the switch: ranks planned, bases from the base's first moment (or the gradient), the
        base's state carried into the cores."""
        base_state, gradients = warmup.optimizer.state, warmup.recorder.gradients()
        plans = self.plan(setup, base_state, gradients)
        if not any(isinstance(v, torch.Tensor) and v.numel() > 1 for state in base_state.values()
                   for v in state.values()) and not any(p.grad is not None for p in setup.params.tracked):
            raise RuntimeError(f"the warm-up gave no parameter a gradient in {steps_taken} steps (step() without a "
                               "backward?): there is nothing to build the low-rank subspaces from. The optimizer "
                               "stays in the warm-up and retries at the next step.")
        starved = [plan.name for plan in plans if plan.projected and plan.rank < USEFUL_RANK and self.rank is None]
        if starved:
            warnings.warn(f"LowRank(state_share={self.state_share}) gives {len(starved)} matrices a rank below "
                          f"{USEFUL_RANK} ({', '.join(starved[:5])}{', ...' if len(starved) > 5 else ''}): raise "
                          "state_share, or keep them free", RuntimeWarning, stacklevel=4)
        if not any(plan.projected for plan in plans):
            warnings.warn(f"LowRank projects none of the {len(plans)} tracked matrices (each has a shorter side of at "
                          f"most min_side={self.min_side}, a rank that would reach it, or a base that keeps no state "
                          "for it): the reduced phase trains every parameter in full with the base and saves no "
                          "state", RuntimeWarning, stacklevel=4)
        phase = LowRankPhase(setup, self, plans)
        with phase.same_rounding():
            self._start(phase, base_state, gradients)
        return phase

    @staticmethod
    def _start(phase: LowRankPhase, base_state: dict, gradients: dict) -> None:
        """The first bases, from the base's first moment (or the switch step's gradient), and the base's state
        carried over."""
        matrices = phase.projected
        sources = {index: source for index, p in enumerate(matrices)
                   if (source := _direction_source(p, base_state, gradients)) is not None}
        phase.map.refresh(_Whole(phase, sources), count=0, agree=phase.agreement()[1])
        for index, (p, core) in enumerate(zip(matrices, phase.cores)):
            carried = phase.carried(index, base_state.get(p, {}))
            if carried:
                phase.optimizer.state[core] = carried
        for p in phase.full:  # parameters trained in full carry their whole state over
            if p in base_state:
                phase.optimizer.state[p] = base_state[p]

    def load(self, setup: Setup, envelope: dict, extra: dict) -> LowRankPhase:
        """A low-rank phase from saved state, built beside the live one (every entry checked first)."""
        missing = [key for key in self.state_keys if key not in extra]
        if missing:
            raise ValueError(f"the low-rank state_dict is missing {', '.join(missing)}")
        matrices = setup.tracked_matrices
        ranks, bases = extra["ranks"], extra["bases"]
        if not isinstance(ranks, list) or len(ranks) != len(matrices) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= min(_matrix_shape(p))
                for r, p in zip(ranks, matrices)):
            raise ValueError(f"the low-rank state_dict's 'ranks' must be one integer in [0, shorter side] per tracked "
                             f"matrix ({len(matrices)}), got {ranks!r}")
        for key, high in (("window_steps", self.refresh_every - 1), ("refreshes", None)):
            value = extra[key]
            if (not isinstance(value, int) or isinstance(value, bool) or value < 0
                    or (high is not None and value > high)):
                bound = f" below refresh_every={self.refresh_every}" if high is not None else ""
                raise ValueError(f"the low-rank state_dict's {key!r} must be a non-negative integer{bound}, "
                                 f"got {value!r}")
        projected = [(p, r) for p, r in zip(matrices, ranks) if r]
        if not isinstance(bases, list) or len(bases) != len(projected):
            raise ValueError(f"the low-rank state_dict holds {len(bases) if isinstance(bases, list) else bases!r} "
                             f"bases for {len(projected)} projected matrices")
        for index, ((p, r), basis) in enumerate(zip(projected, bases)):
            shape = (min(_matrix_shape(p)), r)
            if (not isinstance(basis, torch.Tensor) or tuple(basis.shape) != shape
                    or not bool(torch.isfinite(basis).all())):
                raise ValueError(f"the low-rank state_dict's basis {index} must be a finite {shape} tensor")
        names = [setup.params.names[p][0] for p in matrices]
        counts = [0] * len(matrices)  # the state tensors come with the envelope; the plan only needs the ranks
        plans = [MatrixPlan(name, _matrix_shape(p), r, s) for name, p, r, s in zip(names, matrices, ranks, counts)]
        phase = LowRankPhase(setup, self, plans, bases=[b.to(p.device) for b, (p, _) in zip(bases, projected)])
        phase.window_steps, phase.refreshes = extra["window_steps"], extra["refreshes"]
        load_base_state(phase.optimizer, envelope)
        return phase


class SwitchGradients(WarmupRecorder):
    """The low-rank warm-up records nothing, except in a state saved while the switch is due (a state_dict taken
    inside the switch, or after one that raised): there it keeps the tracked matrices' gradients of the switch
    step, so that a run resumed from it builds the same bases as the one that was not interrupted (with a base
    that keeps no first moment the bases come from that gradient)."""

    def __init__(self, setup: Setup, saved: dict | None = None) -> None:
        self.setup = setup
        self.steps_taken = 0 if saved is None else saved["steps_taken"]
        self.saved = None
        if saved is not None and "switch_gradients" in saved:
            grads, matrices = saved["switch_gradients"], setup.tracked_matrices
            if not isinstance(grads, list) or len(grads) != len(matrices) or not all(
                    g is None or (isinstance(g, torch.Tensor) and g.shape == p.shape and bool(torch.isfinite(g).all()))
                    for g, p in zip(grads, matrices)):
                raise ValueError("the warm-up state_dict's 'switch_gradients' must be one finite gradient (or None) "
                                 f"of its matrix's shape per tracked matrix ({len(matrices)})")
            self.saved = [None if g is None else g.to(p.device) for g, p in zip(grads, matrices)]

    def records_at(self, steps_taken: int) -> bool:
        return False

    def after_step(self, steps_taken: int) -> None:
        self.steps_taken = steps_taken

    def _switch_step(self) -> list[torch.Tensor | None]:
        """Each tracked matrix's gradient of the switch step: saved, or its live ``.grad``."""
        return self.saved if self.saved is not None else [p.grad for p in self.setup.tracked_matrices]

    def gradients(self) -> dict:
        """:meth:`_switch_step` by matrix, the matrices without a gradient left out."""
        return {p: g for p, g in zip(self.setup.tracked_matrices, self._switch_step()) if g is not None}

    def state(self) -> dict:
        if self.steps_taken < self.setup.switch_after:
            return {}
        return {"switch_gradients": [None if g is None else g.detach().clone() for g in self._switch_step()]}

    @property
    def nbytes(self) -> int:
        return 0 if self.saved is None else tensor_bytes(self.saved)


def _direction_source(p: torch.Tensor, base_state: dict, gradients: dict) -> torch.Tensor | None:
    """What a matrix's first directions come from: the base's first moment, else the switch step's gradient."""
    state = base_state.get(p, {})
    return next((state[k] for k in FIRST_MOMENTS if isinstance(state.get(k), torch.Tensor)), gradients.get(p))


def _matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return p.shape[0], p.numel() // p.shape[0]


def _whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather); other tensors as they are."""
    return t.full_tensor() if is_sharded(t) else t


class _Whole(Mapping):
    """Matrix index -> its whole (m, n) value, from this rank's part of it, gathered only when read: a refresh
    holds one whole matrix at a time (every rank reads the same indices in the same order)."""

    def __init__(self, phase: LowRankPhase, parts: dict[int, torch.Tensor]) -> None:
        self.phase, self.parts = phase, parts

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.phase.whole(index, self.parts[index])

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def _decoupled(group: dict, base_name: str) -> bool:
    """Whether the base applies weight decay to the weights (AdamW) rather than adding it to the gradient."""
    return bool(group.get("decoupled_weight_decay", base_name == "AdamW"))


class LowRankPhase:
    """The reduced phase of :class:`LowRank`.

    Public view: ``plans`` (one :class:`MatrixPlan` per tracked matrix: name, shape, rank, 0 = trained in
    full), ``ranks``, ``refreshes`` (how many times the bases were renewed), ``window_steps`` (steps since the
    last refresh), ``map`` (the :class:`~cmd_optim.core.SubspaceMap`), ``cores``, ``core_groups``. State: the
    bases (d r float32 per projected matrix) and the base optimizer's state on the cores and on what trains
    in full. On ranks declared replicas (DDP) the phase runs at the ranks' fewest threads and takes the first
    rank's bases, so replicas on hosts with other thread counts stay bit-identical (:meth:`agreement`).
    """

    name = "lowrank"
    reduced = True

    def __init__(self, setup: Setup, settings: LowRank, plans: list[MatrixPlan],
                 bases: list[torch.Tensor] | None = None) -> None:
        self.setup, self.settings, self.plans = setup, settings, list(plans)
        matrices = setup.tracked_matrices
        self.projected = [p for p, plan in zip(matrices, plans) if plan.projected]
        self.ranks = [plan.rank for plan in plans]
        device = matrices[0].device if matrices else torch.device("cpu")
        self.map = SubspaceMap([_matrix_shape(p) for p in self.projected], [r for r in self.ranks if r], device,
                               bases=bases, seed=settings.seed, kernel=settings.kernel)
        # under FSDP2: each projected matrix's index among the sharded parameters and the rows this rank holds
        self.sharding = setup.sharding
        if self.sharding is None:
            self._shard_index, self._rows = [None] * len(self.projected), [None] * len(self.projected)
        else:
            position = {p: index for index, p in enumerate(self.sharding.params)}
            self._shard_index = [position[p] for p in self.projected]
            self._rows = [self.sharding.rows(index) for index in self._shard_index]
        self.cores = [nn.Parameter(self.as_core(i, torch.zeros(self._local_core_shape(i), device=p.device)))
                      for i, p in enumerate(self.projected)]
        self.window_steps = 0
        self.refreshes = 0
        projected = set(self.projected)
        self.full = [p for p in setup.params.tracked if p not in projected] + list(setup.params.free)
        full = set(self.full)
        groups, self._sources = [], []  # each inner group and (visible group index, is it a core group)
        core_of = dict(zip(self.projected, self.cores))
        for index, visible in enumerate(setup.params.groups):
            cores = [core_of[p] for p in visible["params"] if p in core_of]
            rest = [p for p in visible["params"] if p in full]
            for params, is_core in ((cores, True), (rest, False)):
                if params:
                    groups.append({**hyperparameters(visible), "params": params})
                    self._sources.append((index, is_core))
        self.optimizer = setup.make_base(groups)
        self._agreed = None  # (the group, threads, agree) of :meth:`agreement`, once asked
        self._group_of = {p: index for index, visible in enumerate(setup.params.groups) for p in visible["params"]}
        self._subspace = {p: index for index, p in enumerate(self.projected)}

    @property
    def core_groups(self) -> list[dict]:
        """The inner optimizer's parameter groups that hold cores (their weight decay is 0: it acts on W)."""
        return [inner for inner, (_, is_core) in zip(self.optimizer.param_groups, self._sources) if is_core]

    def adopt(self) -> None:
        self.setup.exchange.attach_subspaces(self)

    def release(self) -> None:
        self.setup.exchange.attach_subspaces(None)

    def subspace_of(self, param: torch.Tensor) -> int | None:
        """For a communication hook: the index in ``map`` of a projected matrix (None for the rest)."""
        return self._subspace.get(param)

    @property
    def refresh_due(self) -> bool:
        """Whether the next step renews the bases from its gradients."""
        return self.window_steps == 0 and self.refreshes > 0

    # ------------------------------------------------------------------ row shards (FSDP2)
    def _split(self, index: int) -> bool:
        """Whether matrix ``index``'s core is split by rows across the ranks (a right core of a sharded matrix)."""
        return self._rows[index] is not None and not self.map.is_left(index)

    def _shared(self, index: int) -> bool:
        """Whether matrix ``index``'s core is whole on every rank and its projection a sum over the ranks."""
        return self._rows[index] is not None and self.map.is_left(index)

    def _local_core_shape(self, index: int) -> tuple[int, int]:
        if not self._split(index):
            return self.map.core_shape(index)
        start, stop = self._rows[index]
        return stop - start, self.map.core_shape(index)[1]

    def as_core(self, index: int, local: torch.Tensor) -> torch.Tensor:
        """This rank's part of a core-shaped tensor as the core holds it: a DTensor over the ranks' rows where
        the core is split, else itself."""
        return self.sharding.global_view(local, self._shard_index[index]) if self._split(index) else local

    def whole(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """The whole (m, n) of matrix ``index`` from a DTensor or from this rank's rows of it (all-gathered)."""
        if is_sharded(t):
            return t.full_tensor()
        return t if self._rows[index] is None else self.sharding.gather(t, self._shard_index[index])

    def carried(self, index: int, state: dict) -> dict:
        """The base's state of a matrix expressed in its core (empty if it holds an entry of an unknown kind:
        that state then restarts)."""
        carried, moments = {}, {}
        for key, value in state.items():
            if key in FIRST_MOMENTS or key in SECOND_MOMENTS:
                moments[key] = self.map.carry(index, self.setup.local(value), key in SECOND_MOMENTS, self._rows[index])
            elif isinstance(value, torch.Tensor) and value.numel() <= 1:
                carried[key] = value.clone()  # step counts and other scalars
            else:
                return {}
        if self._shared(index) and moments:
            self.sharding.all_reduce(list(moments.values()))
        return {**carried, **{key: self.as_core(index, value) for key, value in moments.items()}}

    # ------------------------------------------------------------------ stepping
    def agreement(self) -> tuple[int | None, Callable | None]:
        """How replicas stay bit-identical, as plain DDP's do, though ranks run other thread counts: the ranks'
        fewest thread count to run the phase's products at (BLAS; None where the counts are equal), and
        ``agree``, which makes every refresh take the first rank's bases (LAPACK). The ranks are the FSDP2
        mesh's (the whole left cores and the bases must agree in the same way) or those the user declared
        replicas (:meth:`Setup.replica_group`); (None, None) for a process alone. One collective when first
        needed, and again if the declaration changed since (a hook registered after a loaded state)."""
        group = self.setup.replica_group() if self.sharding is None else self.sharding.group
        if self._agreed is None or self._agreed[0] is not group:
            replicas, threads = (replica_threads([p.numel() for p in self.projected], group)
                                 if group is not None and world_size(group) > 1 else (False, None))
            self._agreed = (group, threads, functools.partial(agree_with_first_rank, group=group) if replicas else None)
        return self._agreed[1:]

    @contextlib.contextmanager
    def same_rounding(self):
        """Run the products of the phase at the ranks' common thread count (a no-op on one process)."""
        threads, _ = self.agreement()
        if threads is None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def step(self, loss, closure: Callable | None) -> bool:
        with self.same_rounding():
            return self._step(loss, closure)

    def _step(self, loss, closure: Callable | None) -> bool:
        self.setup.exchange.check_exchanged()
        full_grads = [self._gradient(index, p.grad) for index, p in enumerate(self.projected)]  # once per step
        grads = self._low_gradients(full_grads)
        if grads is None:
            return False
        if self.refresh_due and any(g is not None for g in grads):
            grads = self._refresh(full_grads, self._local_gradients(full_grads))
        for index, (core, low) in enumerate(zip(self.cores, grads)):
            core.grad = None if low is None else self.as_core(index, low)
        self._sync_hyperparameters()
        guarded_step(self.optimizer, loss, closure, [p for g in self.optimizer.param_groups for p in g["params"]])
        self._follow(full_grads, grads)
        self.window_steps = (self.window_steps + 1) % self.settings.refresh_every
        if self.window_steps == 0:
            self.refreshes += 1  # the next step renews the bases from its gradient
        return True

    def _gradient(self, index: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient the core sees of the matrix's ``grad`` G: G, plus ``weight_decay * W`` where the base
        adds decay to the gradient."""
        p = self.projected[index]
        if grad is None:
            return None
        grad = self.setup.local(grad)
        visible = self.setup.params.groups[self._group_of[p]]
        decay = visible.get("weight_decay", 0.0)
        if decay and not _decoupled(visible, self.setup.make_base.optimizer_name):
            return grad + decay * self.setup.local(p.detach())
        return grad

    def _local_gradients(self, full_grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """What a refresh finds the bases from: this rank's own gradients where the low-rank hook stashed them
        (its ``.grad`` is the compressed average), else ``full_grads``."""
        stash = self.setup.exchange.take_stash()
        return [self._gradient(index, stash[index]) if index in stash else g for index, g in enumerate(full_grads)]

    @torch.no_grad()
    def _low_gradients(self, full_grads: list[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
        """Each core's gradient (projected); None (nothing changed) if one, or a full gradient, is not finite."""
        grads = self._project(full_grads)
        if not self.setup.all_finite([*grads, *(p.grad for p in self.full)]):
            return None
        return grads

    def _project(self, full_grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The projections of ``full_grads`` (this rank's rows of each core; whole cores summed over the ranks)."""
        grads = [None if g is None else self.map.project(index, g, self._rows[index])
                 for index, g in enumerate(full_grads)]
        shared = [g for index, g in enumerate(grads) if g is not None and self._shared(index)]
        if shared:
            self.sharding.all_reduce(shared)
        return grads

    @torch.no_grad()
    def _refresh(self, full_grads: list[torch.Tensor | None],
                 local_grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """New bases from this rank's gradients ``local_grads`` (the first rank's are taken under DDP), the
        cores' state rotated into them (and the exchange told); the new projections of ``full_grads``."""
        rotations = self.map.refresh(_Whole(self, {i: g for i, g in enumerate(local_grads) if g is not None}),
                                     self.refreshes, self.agreement()[1])
        self.setup.exchange.rotated(rotations)
        for index, rotation in rotations.items():
            for key, value in self.optimizer.state.get(self.cores[index], {}).items():
                if key in FIRST_MOMENTS or key in SECOND_MOMENTS:
                    local = self.setup.local(value)
                    local.copy_(self.map.rotate(index, local, rotation, key in SECOND_MOMENTS))
        return self._project(full_grads)

    def _sync_hyperparameters(self) -> None:
        """The visible groups' settings; core groups without weight decay (it is applied to W)."""
        for inner, (index, is_core) in zip(self.optimizer.param_groups, self._sources):
            inner.update(hyperparameters(self.setup.params.groups[index]))
            if is_core and "weight_decay" in inner:
                inner["weight_decay"] = 0.0

    @torch.no_grad()
    def _follow(self, full_grads: list[torch.Tensor | None], grads: list[torch.Tensor | None]) -> None:
        """Move each projected matrix by its core's step (and the residual), then set the core back to 0. A step
        that is not finite anywhere is refused whole (one host sync for every core)."""
        steps = [self.setup.local(core.detach()) for core in self.cores]
        if not self.setup.all_finite(steps):
            for core in self.cores:
                core.zero_()
            return
        ratios = self._split_ratios(steps, grads)
        groups = self.setup.params.groups
        rates = [float(group["lr"]) for group in groups]  # once per group (a tensor lr: one sync each)
        gains = [self._gain(group, rate) for group, rate in zip(groups, rates)]
        keeps = [self._keep(group, rate) for group, rate in zip(groups, rates)]
        for index, (p, core, full, low) in enumerate(zip(self.projected, self.cores, full_grads, grads)):
            if low is None:
                continue
            group = self._group_of[p]
            self.map.apply(index, self.setup.local(p.data), steps[index], full if self.settings.residual else None,
                           low, self._rows[index], ratios.get(index), gains[group], keeps[group])
            core.zero_()

    def _keep(self, group: dict, rate: float) -> float:
        """What decoupled weight decay leaves of a projected matrix of visible ``group`` (at its ``rate``) this
        step: ``1 - rate * weight_decay`` (1 where the base adds the decay to the gradient instead, or has none)."""
        decay = group.get("weight_decay", 0.0)
        if not decay or not _decoupled(group, self.setup.make_base.optimizer_name):
            return 1.0
        return 1.0 - rate * decay

    def _gain(self, group: dict, rate: float) -> float:
        """How many times the base's step a projected matrix of visible ``group`` (at its ``rate``) moves (see
        ``peak_cap``)."""
        scale = self.settings.step_scale
        if not self.settings.peak_cap:
            return scale
        peak = float(group.get("initial_lr", rate))
        return max(1.0, min(scale, peak / rate)) if rate > 0 else 1.0

    def _split_ratios(self, steps: list[torch.Tensor], grads: list[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """For each split core (its rows on several ranks), ``||step|| / ||projected gradient||`` over the whole
        core, which the residual's cap reads: one all-reduce of two numbers per split core."""
        split = [index for index, g in enumerate(grads) if g is not None and self._split(index)]
        if not split or not self.settings.residual:
            return {}
        squares = torch.stack([torch.stack([steps[i].square().sum(), grads[i].float().square().sum()]) for i in split])
        self.sharding.all_reduce([squares])
        norms = squares.sqrt()
        ratios = norms[:, 0] / norms[:, 1].clamp_min(torch.finfo(torch.float32).tiny)
        return {index: ratios[k] for k, index in enumerate(split)}

    def after_step(self, steps_taken: int) -> None:
        pass

    # ------------------------------------------------------------------ accounting and state
    def trainable_dims(self) -> int:
        cores = sum(core.numel() for core in self.cores)
        return cores + sum(p.numel() for p in self.full if p.requires_grad)

    def state_bytes(self) -> int:
        return tensor_bytes(self.map.bases) + tensor_bytes(self.optimizer.state)

    def extra_state(self) -> dict:
        return {"ranks": list(self.ranks), "bases": [b.clone() for b in self.map.bases],
                "window_steps": self.window_steps, "refreshes": self.refreshes}

    def report(self) -> dict:
        return {"matrices": [{"name": plan.name, "shape": list(plan.shape), "rank": plan.rank}
                             for plan in self.plans],
                "state_bytes": self.state_bytes()}
