"""The reduction interface: arguments mean what they say (the design card's line, refused unused arguments),
the default is read from the registry's capabilities, and a new reduction is one registered class."""

import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import nn

from cmd_optim import CMDOptimizer, Gradual, LowRank, Modes
from cmd_optim.optim import REDUCTIONS
from cmd_optim.optim import reduction as reduction_module
from tests._helpers import mlp, train

#: every top-level shortcut CMDOptimizer takes, with a valid value for the reductions that use it
SHORTCUTS = dict(modes=4, samples=50, seed=3, snapshot_every=5, snapshot_device="cpu",
                 snapshot_dtype=torch.float16, snapshot_dir="", keep_decomposition=True)  # snapshot_dir: tmp_path


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def test_the_design_cards_line_trains_at_most_ten_mode_coefficients(digits):
    model = mlp()
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, modes=10, switch_after=100, lr=0.05)
    assert isinstance(optimizer.reduction, Modes) and optimizer.reduction.modes == 10
    assert "Modes(modes=10" in repr(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, digits, 120)
    assert optimizer.phase == "reduced" and optimizer.switch_report["reduction"] == "modes"
    assert 0 < optimizer.trainable_dims <= 10
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_without_modes_the_default_reduction_applies_and_takes_seed():
    optimizer = CMDOptimizer(_model(), base=torch.optim.AdamW, seed=7, lr=1e-3)
    assert isinstance(optimizer.reduction, LowRank) and optimizer.reduction.seed == 7
    assert "LowRank(" in repr(optimizer)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_each_reduction_refuses_the_shortcuts_it_does_not_use(name, tmp_path):
    cls = REDUCTIONS[name]
    given = {**SHORTCUTS, "snapshot_dir": str(tmp_path)}
    unused = [key for key in SHORTCUTS if key not in cls.shortcuts]
    used = {key: given[key] for key in cls.shortcuts if key in given}
    CMDOptimizer(_model(), base=torch.optim.SGD, reduction=name, lr=0.1, momentum=0.9, **used)  # accepted
    if not unused:
        assert set(cls.shortcuts) == set(SHORTCUTS)
    for key in unused:
        first_user = sorted(reduction_module.users_of(key))[0]
        message = rf"{key}= is used by reduction .*'{first_user}'.*not by reduction='{name}'"
        with pytest.raises(TypeError, match=message):
            CMDOptimizer(_model(), base=torch.optim.SGD, reduction=name, lr=0.1, **{key: given[key]})


def test_the_default_refuses_decomposition_arguments_naming_who_uses_them():
    for key in ("samples", "snapshot_every", "snapshot_dtype", "keep_decomposition"):
        with pytest.raises(TypeError, match=rf"{key}= is used by reduction 'modes'.* not by the default reduction "
                                            r"here \('lowrank'\)"):
            CMDOptimizer(_model(), base=torch.optim.SGD, lr=0.1, **{key: SHORTCUTS[key]})


def test_the_default_with_lbfgs_is_the_mode_reduction_and_takes_its_shortcuts():
    optimizer = CMDOptimizer(_model(), base=torch.optim.LBFGS, snapshot_every=5, lr=0.5)
    assert isinstance(optimizer.reduction, Modes) and optimizer.reduction.snapshot_every == 5


def test_a_shortcut_that_contradicts_the_reduction_instance_is_refused():
    with pytest.raises(TypeError, match="modes=4 contradicts"):
        CMDOptimizer(_model(), base=torch.optim.SGD, reduction=Modes(modes=6), modes=4, lr=0.1)
    optimizer = CMDOptimizer(_model(), base=torch.optim.SGD, reduction=Gradual(every=3), modes=4, lr=0.1)
    assert optimizer.reduction == Gradual(every=3, modes=4)


def test_an_unknown_reduction_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"reduction must be one of \['gradual', 'lowrank', 'modes'\]"):
        CMDOptimizer(_model(), base=torch.optim.SGD, reduction="loraish", lr=0.1)


def test_a_new_reduction_is_one_registered_class(monkeypatch):
    """A reduction defined outside the package, registered, is chosen by name and built at the switch with
    nothing else changed; its refusals come from its declared capabilities."""
    monkeypatch.setattr(reduction_module, "REDUCTIONS", dict(reduction_module.REDUCTIONS))
    built = []

    @dataclasses.dataclass(frozen=True)
    class Frozen(LowRank):
        name: ClassVar[str] = "frozen_test"

        def build(self, setup, warmup, steps_taken):
            built.append(steps_taken)
            return super().build(setup, warmup, steps_taken)

    reduction_module.register(Frozen)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model = _model()
    optimizer = CMDOptimizer(model, base=torch.optim.AdamW, reduction="frozen_test", switch_after=3, lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert built == [3] and optimizer.phase == "reduced"
    with pytest.raises(ValueError, match="reduction='frozen_test' cannot run with LBFGS .*: use reduction='modes'"):
        CMDOptimizer(_model(), base=torch.optim.LBFGS, reduction="frozen_test", lr=0.5)
    with pytest.raises(ValueError, match="registered already"):
        reduction_module.register(dataclasses.make_dataclass("Other", [], bases=(Frozen,), frozen=True))
