"""The low-rank reduction: after the switch each weight matrix moves only inside a small, refreshed subspace.

Every matrix-shaped parameter W (m x n; a conv kernel is viewed as (out, in * kernel)) moves as
``W = W_switch + U S V^T``: the r x r *core* S is what the base optimizer trains, ``U`` (m x r) and ``V``
(n x r) are orthonormal directions. The core's gradient is ``U^T G V`` (G the gradient the backward pass
computes anyway), and W follows every change of S. Parameters with fewer than two dimensions (biases,
normalisation weights) and the ``keep_free`` ones train in full with the base optimizer.

What keeps it learning (measured in docs/benchmarks.md and the research notes it cites):

- **Refreshed directions.** A decayed sum of the gradients is kept (``acc``, bfloat16 by default); every
  ``refresh_every`` steps U, V become its top-r singular vectors (a randomised range finder with one power
  iteration, its random matrix seeded by the refresh count and the shape, so data-parallel replicas agree),
  the optimizer's state is re-expressed in the new basis, S restarts at 0 (its effect is already in W), and
  ``acc`` is multiplied by ``memory``.
- **A matched step.** The core's learning rate is the base rate times ``mu``, measured from the ratio
  ``sum ||G||^2 / sum ||U^T G V||^2``: its square root for SGD-like bases (a core step as long as the full
  step), the ratio of 1-norms for the sign-like steps of Adam-family bases (the same first-order decrease);
  decayed across windows like ``acc`` and clipped to ``[1, max_step_ratio]``.
- **Ranks from a budget.** ``r_W = floor(sqrt(beta m n))``, capped at ``max_rank`` and min(m, n), beta as
  large as keeps ``sum r_W^2`` plus the free parameters within ``budget`` times the model's parameters
  (default 1%, 5% under 100K parameters).
- **Sparse tables frozen.** A matrix whose gradients reached fewer than ``freeze_sparse_below`` of its rows
  over the warm-up's last ``refresh_every`` steps (an embedding: a vocabulary, a position table) stays as it
  is after the switch: its updates are sparse and rare, and a dense low-rank core for it would cost a full
  pass over the table every step. Weight matrices of layers get gradients in every row and are not affected.

It uses no CMD decomposition: the warm-up records no snapshots for it. The initial directions are the
top singular vectors of the base optimizer's first moment at the switch (momentum, ``exp_avg``), or of the
switch step's gradient for bases without one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..core import kernels
from ..core._checks import check_dtype, check_int, check_real
from ._params import all_finite, hyperparameters, tensor_bytes
from .phase import Setup, _NonFinite, guarded_step
from .warmup import WarmupPhase, load_base_state

__all__ = ["LowRank", "LowRankPhase", "allocate_ranks"]

#: Optimizer-state entries carried into (and rotated with) the core: first moments move linearly, second
#: moments through the squared rotation (exact if the coordinates were independent).
FIRST_MOMENTS = ("momentum_buffer", "exp_avg", "grad_avg")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


def allocate_ranks(shapes: list[tuple[int, int]], budget: int, max_rank: int | None = None) -> list[int]:
    """Ranks ``r_i = floor(sqrt(beta m_i n_i))``, each in ``[1, min(m_i, n_i, max_rank)]``, with the largest beta
    that keeps ``sum r_i^2 <= budget`` (every matrix gets rank 1 even when the budget is smaller; with a cap,
    the budget may be left partly unused)."""
    def ranks(beta: float) -> list[int]:
        return [max(1, min(m, n, max_rank or m, int(math.sqrt(beta * m * n)))) for m, n in shapes]

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(r * r for r in ranks(middle)) <= budget:
            low = middle
        else:
            high = middle
    return ranks(low)


class LowRank:
    """``CMDOptimizer(..., reduction=LowRank())``: the default reduction.

    Args:
        budget: the share of the model's parameters trained after the switch (cores plus free parameters);
            default 0.01, or 0.05 for models under 100K parameters.
        max_rank: the largest core rank r (None: no cap). Above it a core costs more per step than it gains.
        refresh_every: reduced steps between two refreshes of the directions (K).
        memory: how much of the gradient sum and of the step-size statistics a refresh keeps.
        max_step_ratio: the largest multiplier of the base learning rate a core may get.
        freeze_sparse_below: a matrix whose gradients reached fewer than this share of its rows over the
            warm-up's last ``refresh_every`` steps (an embedding table) is frozen after the switch (0: never).
        accumulator_dtype: the dtype of the gradient sum (bfloat16: 2 bytes per parameter).
    """

    name = "lowrank"
    needs_snapshots = False

    def __init__(self, budget: float | None = None, max_rank: int | None = 32, refresh_every: int = 20,
                 memory: float = 0.8, max_step_ratio: float = 10.0, freeze_sparse_below: float = 0.5,
                 accumulator_dtype: torch.dtype = torch.bfloat16) -> None:
        self.budget = None if budget is None else check_real("budget", budget, low=0, high=1, low_open=True)
        self.max_rank = None if max_rank is None else check_int("max_rank", max_rank, low=1)
        self.refresh_every = check_int("refresh_every", refresh_every, low=1)
        self.memory = check_real("memory", memory, low=0, high=1)
        self.max_step_ratio = check_real("max_step_ratio", max_step_ratio, low=1)
        self.freeze_sparse_below = check_real("freeze_sparse_below", freeze_sparse_below, low=0, high=1)
        self.accumulator_dtype = check_dtype("accumulator_dtype", accumulator_dtype)

    @property
    def row_window(self) -> int:
        """Warm-up steps over which the rows that get gradients are marked (0 when nothing is frozen)."""
        return self.refresh_every if self.freeze_sparse_below > 0 else 0

    def __repr__(self) -> str:
        return (f"LowRank(budget={self.budget}, max_rank={self.max_rank}, refresh_every={self.refresh_every}, "
                f"memory={self.memory}, max_step_ratio={self.max_step_ratio}, "
                f"freeze_sparse_below={self.freeze_sparse_below})")

    def check(self, setup: Setup) -> None:
        """Refuse, at construction, what this reduction cannot do."""
        if setup.sharding is not None:
            raise ValueError("reduction=LowRank is not available with FSDP2-sharded parameters yet: use "
                             "reduction='modes'")
        if setup.make_base.optimizer_name == "LBFGS":
            raise ValueError("reduction=LowRank trains one parameter group per matrix, and LBFGS takes a single "
                             "group: use reduction='modes' with LBFGS")

    def share(self, total: int) -> float:
        return self.budget if self.budget is not None else (0.05 if total < 100_000 else 0.01)

    def build(self, setup: Setup, warmup: WarmupPhase, fit=None) -> LowRankPhase:
        """The low-rank phase at the switch: sparse tables frozen, ranks from the budget, directions from the
        base's first moment."""
        marks = dict(zip(setup.watched_matrices, warmup.touched_rows or []))
        frozen = [index for index, p in enumerate(setup.tracked_matrices)
                  if p in marks and float(marks[p].float().mean()) < self.freeze_sparse_below]
        matrices, free = _split(setup, frozen)
        total = sum(p.numel() for p in setup.params.tracked) + sum(p.numel() for p in setup.params.free)
        budget = int(self.share(total) * total) - sum(p.numel() for p in free if p.requires_grad)
        shapes = [_matrix_shape(p) for p in matrices]
        ranks = allocate_ranks(shapes, budget, self.max_rank)
        base_state = warmup.optimizer.state
        directions = []
        for p, (m, n), r in zip(matrices, shapes, ranks):
            state = base_state.get(p, {})
            source = next((state[k] for k in FIRST_MOMENTS if isinstance(state.get(k), torch.Tensor)), p.grad)
            source = source.reshape(m, n) if source is not None else None
            directions.append(_top_directions(source, r, seed=m * 1_000_003 + n) or _random_directions(m, n, r, p))
        sign_like = any(key in SECOND_MOMENTS for state in base_state.values() for key in state)
        phase = LowRankPhase(setup, self, matrices, free, ranks, directions, sign_like, frozen)
        for p, core, (u, v) in zip(matrices, phase.cores, directions):
            carried = _carry(base_state.get(p, {}), lambda x, q=p: x.reshape(_matrix_shape(q)), u, v)
            if carried:
                phase.optimizer.state[core] = carried
        for p in free:  # parameters kept free carry their whole state over
            if p in base_state:
                phase.optimizer.state[p] = base_state[p]
        return phase

    def load(self, setup: Setup, envelope: dict, extra: dict) -> LowRankPhase:
        """A low-rank phase from saved state, built beside the live one (every entry checked first)."""
        required = ("ranks", "directions", "cores", "applied", "sums", "ratios", "statistics", "window_steps",
                    "sign_like", "frozen", "refreshes")
        missing = [key for key in required if key not in extra]
        if missing:
            raise ValueError(f"the low-rank state_dict is missing {', '.join(missing)}")
        candidates = setup.tracked_matrices
        frozen = [int(i) for i in extra["frozen"]]
        if any(not 0 <= i < len(candidates) or candidates[i].ndim != 2 for i in frozen):
            raise ValueError(f"the low-rank state_dict freezes matrices {frozen}, which this model does not have")
        matrices, free = _split(setup, frozen)
        ranks = [int(r) for r in extra["ranks"]]
        if len(ranks) != len(matrices) or len(extra["directions"]) != len(matrices):
            raise ValueError(f"the low-rank state_dict covers {len(ranks)} matrices, this optimizer has "
                             f"{len(matrices)}")
        for index, (p, r) in enumerate(zip(matrices, ranks)):
            (m, n), (u, v) = _matrix_shape(p), extra["directions"][index]
            expect = {"directions": [(m, r), (n, r)], "cores": [(r, r)], "applied": [(r, r)], "sums": [(m, n)]}
            found = {"directions": [u, v], "cores": [extra["cores"][index]], "applied": [extra["applied"][index]],
                     "sums": [extra["sums"][index]]}
            for key, shapes in expect.items():
                for tensor, shape in zip(found[key], shapes):
                    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                        raise ValueError(f"the low-rank state_dict's {key!r} of matrix {index} does not fit a "
                                         f"{tuple(p.shape)} parameter at rank {r}")
                    if not bool(torch.isfinite(tensor).all()):
                        raise ValueError(f"the low-rank state_dict's {key!r} of matrix {index} is not finite")
        directions = [(u.to(p.device), v.to(p.device)) for p, (u, v) in zip(matrices, extra["directions"])]
        phase = LowRankPhase(setup, self, matrices, free, ranks, directions, bool(extra["sign_like"]), frozen)
        with torch.no_grad():
            for index in range(len(matrices)):
                phase.cores[index].copy_(extra["cores"][index])
                phase.applied[index].copy_(extra["applied"][index])
                phase.sums[index].copy_(extra["sums"][index])
        phase.ratios = [float(x) for x in extra["ratios"]]
        phase.statistics = [[float(a), float(b)] for a, b in extra["statistics"]]
        phase.window_steps = int(extra["window_steps"])
        phase.refreshes = int(extra["refreshes"])
        load_base_state(phase.optimizer, envelope)
        return phase


@torch.compiler.disable  # a C call and two Python floats: nothing for a compiled graph
def _accumulate(total: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """``total += grad`` (rounded to ``total``'s dtype), and ``sum |grad|``, ``sum grad^2``: one fused pass
    through the C extension for a bfloat16 sum on the CPU, three stock-PyTorch passes otherwise."""
    if (kernels.cpu is not None and total.dtype == torch.bfloat16 and total.device.type == "cpu"
            and total.is_contiguous() and kernels.cpu.supports([grad])):
        return kernels.cpu.accumulate(total, grad)
    total.add_(grad.to(total.dtype))
    return float(grad.abs().sum(dtype=torch.float32)), float(grad.float().square().sum())


def _split(setup: Setup, frozen: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tracked matrices that get a core (all but the ``frozen`` indices among them), and what trains in
    full: 1-D tracked parameters and the free ones."""
    matrices = [p for index, p in enumerate(setup.tracked_matrices) if index not in frozen]
    vectors = [p for p in setup.params.tracked if p.ndim < 2]
    return matrices, vectors + list(setup.params.free)


def _matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return p.shape[0], p.numel() // p.shape[0]


def _top_directions(source: torch.Tensor | None, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Orthonormal U (m, r), V (n, r): the top-r singular vectors of ``source`` (m, n), or None if it is missing,
    zero or not finite. Exact for small matrices; otherwise a randomised range finder with one power
    iteration, O(m n r), its Gaussian test matrix drawn from ``seed`` (the global RNG is not touched)."""
    if source is None:
        return None
    a = source.float()
    if not bool(torch.isfinite(a).all()) or not bool(a.abs().amax() > 0):
        return None
    m, n = a.shape
    if r * 4 >= min(m, n):
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r].contiguous(), vh[:r].T.contiguous()
    k = min(r + 8, m, n)
    test = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(a.device)
    q = torch.linalg.qr(a @ test).Q
    q = torch.linalg.qr(a.T @ q).Q
    q = torch.linalg.qr(a @ q).Q
    u, _, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u[:, :r]).contiguous(), vh[:r].T.contiguous()


def _random_directions(m: int, n: int, r: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal U (m, r), V (n, r) drawn from a generator seeded by the shape, for a matrix with no signal."""
    generator = torch.Generator().manual_seed(m * 1_000_003 + n)
    u = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=generator)).Q
    return u.to(like.device).contiguous(), v.to(like.device).contiguous()


def _carry(state: dict, as_matrix: Callable, u: torch.Tensor, v: torch.Tensor) -> dict:
    """The base optimizer's state of a matrix, projected into its core (empty if it holds entries of an
    unknown kind: that state then restarts)."""
    carried = {}
    for key, value in state.items():
        if key in FIRST_MOMENTS:
            carried[key] = u.T @ as_matrix(value).float() @ v
        elif key in SECOND_MOMENTS:
            carried[key] = (u * u).T @ as_matrix(value).float() @ (v * v)
        elif isinstance(value, torch.Tensor) and value.numel() <= 1:
            carried[key] = value.clone()  # step counts and other scalars
        else:
            return {}
    return carried


class LowRankPhase:
    """The reduced phase of :class:`LowRank`.

    State per matrix: U, V ((m + n) r float32), the core and what W has followed of it (2 r^2), the decayed
    gradient sum (m n in ``accumulator_dtype``), two step-size statistics and the step-size ratio; plus the
    base optimizer's state on the cores and the free parameters. Frozen tables (``frozen``: their indices
    among the tracked matrices) hold nothing and do not move.
    """

    name = "lowrank"
    reduced = True

    def __init__(self, setup: Setup, strategy: LowRank, matrices, free, ranks, directions, sign_like: bool,
                 frozen: list[int]) -> None:
        self.setup, self.strategy, self.frozen = setup, strategy, list(frozen)
        self.matrices, self.free, self.ranks = list(matrices), list(free), list(ranks)
        self.directions = [(u.float().contiguous(), v.float().contiguous()) for u, v in directions]
        self.cores = [nn.Parameter(torch.zeros(r, r, device=p.device)) for p, r in zip(self.matrices, self.ranks)]
        self.applied = [torch.zeros(r, r, device=p.device) for p, r in zip(self.matrices, self.ranks)]
        self.sums = [torch.zeros(_matrix_shape(p), dtype=strategy.accumulator_dtype, device=p.device)
                     for p in self.matrices]
        self.statistics = [[0.0, 0.0] for _ in self.matrices]  # decayed sums of ||G|| and ||U^T G V||
        self.ratios = [1.0 for _ in self.matrices]
        self.window_steps = 0
        self.refreshes = 0
        group_of = {p: index for index, group in enumerate(setup.params.groups) for p in group["params"]}
        self._core_groups = [group_of[p] for p in self.matrices]
        groups = [{**hyperparameters(setup.params.groups[g]), "params": [core]}
                  for core, g in zip(self.cores, self._core_groups)]
        free_set = set(self.free)
        groups += [{**hyperparameters(visible), "params": [p for p in visible["params"] if p in free_set]}
                   for visible in setup.params.groups]
        self.optimizer = setup.make_base([g for g in groups if g["params"]])
        self._free_groups = [index for index, visible in enumerate(setup.params.groups)
            if any(p in free_set for p in visible["params"])]
        self.sign_like = sign_like  # a base with second moments steps about lr per coordinate: match 1-norms

    def adopt(self) -> None:
        pass

    # ------------------------------------------------------------------ stepping
    def step(self, loss, closure: Callable | None) -> bool:
        if not self._load_core_gradients(accumulate=True):
            return False
        self._sync_hyperparameters()

        def reevaluate():
            self._follow()
            value = closure()
            if not self._load_core_gradients(accumulate=False):
                raise _NonFinite
            return value

        watched = [p for group in self.optimizer.param_groups for p in group["params"]]
        # Only LBFGS re-evaluates and is rolled back by guarded_step, and it is refused at construction:
        # nothing needs saving here for a step that is undone.
        guarded_step(self.optimizer, loss, closure, watched, reevaluate)
        self._follow()
        self.window_steps += 1
        if self.window_steps == self.strategy.refresh_every:
            self._refresh()
        return True

    @torch.no_grad()
    def _load_core_gradients(self, accumulate: bool) -> bool:
        """Each core's gradient ``U^T G V``; False (nothing changed) if one, or a free gradient, is not finite.
        With ``accumulate``, the gradient sum and the step-size statistics take this step in."""
        grads = []
        for p, (u, v) in zip(self.matrices, self.directions):
            grads.append(None if p.grad is None else u.T @ p.grad.reshape(u.shape[0], v.shape[0]).float() @ v)
        if not all_finite([*grads, *(p.grad for p in self.free)]):
            return False
        for index, (p, core, grad) in enumerate(zip(self.matrices, self.cores, grads)):
            core.grad = grad
            if grad is None or not accumulate:
                continue
            absolute, square = _accumulate(self.sums[index], p.grad.reshape(self.sums[index].shape))
            self.statistics[index][0] += absolute if self.sign_like else square
            self.statistics[index][1] += float(grad.abs().sum() if self.sign_like else grad.square().sum())
        return True

    def _sync_hyperparameters(self) -> None:
        """The visible groups' settings, with each core's rate scaled by its measured ratio."""
        groups = self.optimizer.param_groups
        for inner, g, ratio in zip(groups, self._core_groups, self.ratios):
            inner.update(hyperparameters(self.setup.params.groups[g]))
            inner["lr"] = self.setup.params.groups[g]["lr"] * ratio
        for inner, g in zip(groups[len(self.cores):], self._free_groups):
            inner.update(hyperparameters(self.setup.params.groups[g]))

    @torch.no_grad()
    def _follow(self) -> None:
        """Move each matrix by ``U (S - S_applied) V^T``; a change that is not finite is refused. One host sync
        checks every change; each is checked on its own only when one is not finite."""
        changes = [core.detach() - applied for core, applied in zip(self.cores, self.applied)]
        every_finite = all_finite(changes)
        for p, core, applied, change, (u, v) in zip(self.matrices, self.cores, self.applied, changes,
                                                    self.directions):
            if not every_finite and not bool(torch.isfinite(change).all()):
                core.copy_(applied)
                continue
            if p.grad is not None:
                move = (u @ change) @ v.T
                if p.is_contiguous():
                    p.view(move.shape).add_(move.to(p.dtype))
                else:
                    p.add_(move.view(p.shape).to(p.dtype))
            applied.copy_(core.detach())

    @torch.no_grad()
    def _refresh(self) -> None:
        """New directions from the gradient sum, the state rotated into them, the cores restarted at 0."""
        keep = self.strategy.memory
        for index in range(len(self.matrices)):
            gradient, core = self.statistics[index]
            if core > 0:
                ratio = gradient / core if self.sign_like else math.sqrt(gradient / core)
                self.ratios[index] = min(self.strategy.max_step_ratio, max(1.0, ratio))
            self.statistics[index] = [gradient * keep, core * keep]
            old_u, old_v = self.directions[index]
            m, n = self.sums[index].shape
            found = _top_directions(self.sums[index], self.ranks[index], self.refreshes * 1_000_003 + m * 1009 + n)
            new_u, new_v = found or (old_u, old_v)  # no signal in the sum: keep the directions
            left, right = new_u.T @ old_u, old_v.T @ new_v  # new <- old
            state = self.optimizer.state.get(self.cores[index], {})
            for key, value in state.items():
                if key in FIRST_MOMENTS:
                    value.copy_(left @ value @ right)
                elif key in SECOND_MOMENTS:
                    value.copy_((left * left) @ value @ (right * right))
            self.directions[index] = (new_u, new_v)
            self.cores[index].zero_()
            self.applied[index].zero_()
            self.sums[index].mul_(keep)
        self.window_steps = 0
        self.refreshes += 1

    def after_step(self, steps_taken: int) -> None:
        pass

    # ------------------------------------------------------------------ accounting and state
    def trainable_dims(self) -> int:
        return sum(r * r for r in self.ranks) + sum(p.numel() for p in self.free if p.requires_grad)

    def state_bytes(self) -> int:
        return (tensor_bytes(self.directions) + tensor_bytes(self.sums) + tensor_bytes(self.applied)
                + tensor_bytes(self.optimizer.state))

    def extra_state(self) -> dict:
        return {
            "ranks": list(self.ranks),
            "directions": [[u.clone(), v.clone()] for u, v in self.directions],
            "cores": [core.detach().clone() for core in self.cores],
            "applied": [a.clone() for a in self.applied],
            "sums": [s.clone() for s in self.sums],
            "ratios": list(self.ratios),
            "statistics": [list(s) for s in self.statistics],
            "window_steps": self.window_steps,
            "sign_like": self.sign_like,
            "frozen": list(self.frozen),
            "refreshes": self.refreshes,
        }
