"""The torch.optim contract, one harness over every base optimizer, phase and reduction (in the manner of
timm's tests/test_optim.py): lockstep resume with an LR scheduler running, deepcopy and pickle, closures,
zero_grad, repr and the base class's hooks."""

import copy
import pickle

import pytest
import torch
from torch import nn

from cmd_optim import CMDOptimizer, Gradual, LowRank, Modes
from cmd_optim.optim import REDUCTIONS as REGISTERED
from tests._helpers import batch_index, roundtrip, same_weights

BASES = {
    "SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "Adam": (torch.optim.Adam, dict(lr=1e-2)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-3)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=5e-2)),
    "LBFGS": (torch.optim.LBFGS, dict(lr=0.5, max_iter=3, history_size=5)),
}
#: a small configuration of every registered reduction (a new reduction must add one here), and its options
#: that change what is stepped
REDUCTIONS = {"modes": lambda: Modes(modes=4, samples=200, snapshot_every=5),
              "gradual": lambda: Gradual(modes=4, samples=200, snapshot_every=5, every=2, fraction=0.25),
              "gradual-pooled": lambda: Gradual(modes=4, samples=200, snapshot_every=5, every=2, fraction=0.25,
                                                embedded_gradient="pooled"),
              "lowrank": lambda: LowRank(rank=2, refresh_every=3, min_side=2)}
SWITCH, END = 20, 36
STOPS = {"warmup": 10, "switch": SWITCH, "reduced": 28}  # where a run is saved or copied

#: every base with every reduction that declares it can run with it (the rest are refused at construction)
CASES = [(base, name) for base in BASES for name in REDUCTIONS
         if REDUCTIONS[name]().refusal(BASES[base][0].__name__, sharded=False) is None]


def test_every_registered_reduction_is_in_the_matrix():
    assert {make().name for make in REDUCTIONS.values()} == set(REGISTERED)


class Run:
    """A small model, its CMDOptimizer and an LR schedule, stepped on fixed batches (always with a closure
    for LBFGS, and for the others with or without one)."""

    def __init__(self, base: str, reduction: str, closure: bool = True) -> None:
        self.data = _data()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
        cls, kwargs = BASES[base]
        self.optimizer = CMDOptimizer(self.model, base=cls, switch_after=SWITCH, reduction=REDUCTIONS[reduction](),
                                      **kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.97 ** step)
        self.closure = closure or base == "LBFGS"
        self.lrs: list[float] = []

    def loss(self, step: int) -> torch.Tensor:
        x, y = self.data
        index = batch_index(step, len(x), 16)
        return nn.functional.cross_entropy(self.model(x[index]), y[index])

    def steps(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            if self.closure:
                def closure(step=step):
                    self.optimizer.zero_grad()
                    loss = self.loss(step)
                    loss.backward()
                    return loss
                self.optimizer.step(closure)
            else:
                self.optimizer.zero_grad()
                self.loss(step).backward()
                self.optimizer.step()
            self.scheduler.step()
            self.lrs.append(self.optimizer.inner_optimizer.param_groups[0]["lr"])

    def save(self) -> dict:
        return roundtrip({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "scheduler": self.scheduler.state_dict()})

    def load(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])


_DATA = {}


def _data():
    if not _DATA:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 12, generator=gen)
        _DATA["xy"] = (x, (x[:, :3] * 2 + 0.3 * torch.randn(256, 3, generator=gen)).argmax(1))
    return _DATA["xy"]


@pytest.mark.parametrize("closure", [True, False])
@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("base, reduction", CASES)
def test_lockstep_resume_with_a_scheduler_is_bit_identical(base, reduction, stop, closure):
    if base == "LBFGS" and not closure:
        pytest.skip("LBFGS needs a closure")
    whole = Run(base, reduction, closure)
    whole.steps(0, END)
    assert whole.optimizer.phase == "reduced"

    first = Run(base, reduction, closure)
    first.steps(0, STOPS[stop])
    saved = first.save()
    resumed = Run(base, reduction, closure)
    resumed.load(saved)
    resumed.steps(STOPS[stop], END)
    assert same_weights(whole.model, resumed.model)
    assert whole.lrs[STOPS[stop]:] == resumed.lrs  # the schedule reached the optimizer that steps
    assert resumed.optimizer.steps_taken == whole.optimizer.steps_taken == END


def _plain_steps(model, optimizer, data, start, stop):
    x, y = data
    for step in range(start, stop):
        def closure(step=step):
            optimizer.zero_grad()
            index = batch_index(step, len(x), 16)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            return loss
        optimizer.step(closure)


@pytest.mark.parametrize("stop", ["warmup", "reduced"])
@pytest.mark.parametrize("base, reduction", CASES)
def test_deepcopy_and_pickle_give_working_optimizers(base, reduction, stop):
    run = Run(base, reduction)
    run.steps(0, STOPS[stop])
    original = [p.detach().clone() for p in run.model.parameters()]
    twins = [copy.deepcopy((run.model, run.optimizer)), pickle.loads(pickle.dumps((run.model, run.optimizer)))]
    _plain_steps(run.model, run.optimizer, run.data, STOPS[stop], END)
    assert any(not torch.equal(p, q) for p, q in zip(original, run.model.parameters()))
    for model, optimizer in twins:
        assert optimizer.phase == run.optimizer.phase or stop == "warmup"
        assert same_weights_as(original, model)  # the copy is its own: the original's steps did not move it
        _plain_steps(model, optimizer, run.data, STOPS[stop], END)
        assert optimizer.phase == "reduced" and optimizer.steps_taken == END
        assert same_weights(run.model, model)


@pytest.mark.parametrize("stop", [1, SWITCH + 2])
@pytest.mark.parametrize("base, reduction", CASES)
def test_closure_returns_the_loss_and_zero_grad_clears(base, reduction, stop):
    run = Run(base, reduction)
    run.steps(0, stop)

    def closure():
        run.optimizer.zero_grad()
        loss = run.loss(99)
        loss.backward()
        return loss

    expected = float(run.loss(99).detach())
    assert float(run.optimizer.step(closure).detach()) == expected
    run.optimizer.zero_grad()
    assert all(p.grad is None for p in run.model.parameters())
    stepped = [p for group in run.optimizer.inner_optimizer.param_groups for p in group["params"]]
    assert stepped and all(p.grad is None for p in stepped)  # the cores and coefficients too
    run.loss(0).backward()
    run.optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in run.model.parameters())


@pytest.mark.parametrize("base, reduction", CASES)
def test_repr_names_the_phase_the_reduction_and_the_base(base, reduction):
    run = Run(base, reduction)
    name = type(REDUCTIONS[reduction]()).__name__
    assert repr(run.optimizer).startswith(f"CMDOptimizer(phase='warmup', reduction={name}(")
    assert f"base={base})" in repr(run.optimizer)
    run.steps(0, SWITCH)
    assert "phase='reduced'" in repr(run.optimizer)


@pytest.mark.parametrize("base, reduction", CASES)
def test_the_base_class_hooks_fire(base, reduction):
    run = Run(base, reduction)
    fired = []
    opt = run.optimizer
    opt.register_step_pre_hook(lambda o, args, kwargs: fired.append("step-pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: fired.append("step-post"))
    opt.register_state_dict_pre_hook(lambda o: fired.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "hooked": True})
    opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load-post"))
    for stop in (5, SWITCH + 3):
        run.steps(0 if stop == 5 else 5, stop)
        state = opt.state_dict()
        assert state["hooked"] and {"state", "param_groups", "cmd"} <= set(state)
        opt.load_state_dict(state)
    assert fired.count("step-pre") == fired.count("step-post") == SWITCH + 3
    assert fired.count("save-pre") == fired.count("load-pre") == fired.count("load-post") == 2


@pytest.mark.parametrize("base, reduction", CASES)
def test_param_groups_are_the_list_the_stepping_optimizer_reads(base, reduction):
    """After construction, the switch and any load, a change of ``param_groups`` reaches the next step."""
    run = Run(base, reduction)
    saved_warmup = None
    for stop in (8, SWITCH + 4):
        run.steps(0 if stop == 8 else 8, stop)
        saved_warmup = saved_warmup or run.save()
        for source in (run.save(), saved_warmup):
            run.optimizer.load_state_dict(source["optimizer"])
            run.optimizer.param_groups[0]["lr"] = 0.0
            before = [p.detach().clone() for p in run.model.parameters()]
            run.steps(100, 101)
            assert same_weights_as(before, run.model), (stop, run.optimizer.phase)
            run.optimizer.param_groups[0]["lr"] = BASES[base][1]["lr"]
        run.optimizer.load_state_dict(source["optimizer"])


def same_weights_as(tensors, model):
    return all(torch.equal(a, b) for a, b in zip(tensors, model.parameters()))
