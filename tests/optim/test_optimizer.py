"""CMDOptimizer's behaviour: what the phases do to the weights, on real data."""

import math

import pytest
import torch
from torch import nn

import cmd_optim.optim.modes as modes_module
from benchmarks import datasets
from cmd_optim import CMDOptimizer, Gradual, Modes
from cmd_optim.core import ModeMap
from tests._helpers import accuracy, full_batch_losses, mlp, roundtrip, same_weights, train

SGD = dict(lr=0.05, momentum=0.9)


def cmd(model, **kwargs):
    settings = dict(base=torch.optim.SGD, modes=10, switch_after=300, snapshot_every=10, reduction="modes", **SGD)
    settings.update(kwargs)
    return CMDOptimizer(model, **settings)


def test_digits_reduced_phase_holds_plain_sgd_accuracy(digits):
    model = mlp()
    train(model, torch.optim.SGD(model.parameters(), **SGD), digits, 600)
    sgd_accuracy = accuracy(model, digits)

    model = mlp()
    optimizer = cmd(model)
    phases = {}
    train(model, optimizer, digits, 600, on_step=lambda s: phases.setdefault(optimizer.phase, s))
    assert phases == {"warmup": 1, "reduced": 300}
    assert optimizer.trainable_dims <= 10
    assert optimizer.snapshot_bytes == 0
    assert optimizer.decomposition is None and optimizer.skipped_steps == 0  # not kept unless asked for
    cmd_accuracy = accuracy(model, digits)
    assert cmd_accuracy > 0.90
    assert abs(cmd_accuracy - sgd_accuracy) <= 0.02, (cmd_accuracy, sgd_accuracy)


def test_warmup_is_the_base_optimizer_and_the_switch_does_not_move_weights(digits):
    reference = mlp()
    train(reference, torch.optim.SGD(reference.parameters(), **SGD), digits, 300)
    model = mlp()
    optimizer = cmd(model)
    train(model, optimizer, digits, 300)
    assert optimizer.phase == "reduced"
    assert same_weights(model, reference)


class NaiveMap(ModeMap):
    """The unsafeguarded map: raw slopes u_i = a_i (no RMS units, no clipping), mode gradient sum_i a_i g_i
    with no least-squares normalisation. It overrides ``from_fit``, the constructor the mode phase calls."""

    @classmethod
    def from_fit(cls, fit, params, groups, num_groups, max_slope=None, kernel="auto", reduce=None, **layout):
        mapped = cls.__new__(cls)
        mapped._build(fit.a, fit.assignment, [tuple(p.shape) for p in params], [p.device for p in params], groups,
                      fit.num_modes, num_groups, torch.ones(fit.num_modes), kernel, layout, reduce)
        return mapped

    def from_sums(self, sums):
        return sums.to(self.device).float()


def _naive(monkeypatch) -> None:
    monkeypatch.setattr(modes_module, "ModeMap", NaiveMap)


def test_the_naive_map_is_the_map_the_phase_steps_with(digits, monkeypatch):
    _naive(monkeypatch)
    model = mlp()
    optimizer = cmd(model, reduction=Modes(speed_limit=False))
    train(model, optimizer, digits, 301)
    mode_map = optimizer.reduced_phase.map
    assert type(mode_map) is NaiveMap
    # raw slopes: not clipped to max_slope and not of RMS 1 per mode (the safeguarded map's are)
    slopes = torch.cat([u.reshape(-1) for u in mode_map.slopes])
    assert float(slopes.abs().max()) > Modes().max_slope or not torch.allclose(
        slopes.square().mean(), torch.tensor(1.0), rtol=0.05)


def test_without_the_safeguards_the_same_hyperparameters_diverge(digits, monkeypatch):
    _naive(monkeypatch)
    model = mlp()
    optimizer = cmd(model, reduction=Modes(speed_limit=False))
    train(model, optimizer, digits, 400)
    assert type(optimizer.reduced_phase.map) is NaiveMap
    weights_finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.skipped_steps > 0 or not weights_finite or accuracy(model, digits) < 0.5


def test_the_speed_limit_alone_keeps_the_naive_map_stable(digits, monkeypatch):
    _naive(monkeypatch)  # u = a: a reference has u = 1
    model = mlp()
    optimizer = cmd(model)
    train(model, optimizer, digits, 600)
    assert type(optimizer.reduced_phase.map) is NaiveMap
    assert optimizer.skipped_steps == 0 and optimizer.limited_steps > 100
    assert accuracy(model, digits) > 0.9


def test_second_model_cnn_on_mnist1d_with_adam():
    """A second model and base: the reduced phase keeps what the warm-up reached. (The bound does not depend
    on the thread count: an earlier one compared with Adam trained in full and failed with one thread.)"""
    pytest.importorskip("mnist1d")
    split = datasets.mnist1d(num_samples=3000, seed=42)

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 40, 10))

    model = cnn()
    optimizer = CMDOptimizer(model, base=torch.optim.Adam, modes=10, switch_after=500, snapshot_every=25, lr=3e-3,
                             reduction="modes")
    train(model, optimizer, split, 500, batch=128)
    at_switch = accuracy(model, split)
    train(model, optimizer, split, 1000, batch=128, start=500)
    assert optimizer.trainable_dims <= 10
    assert optimizer.skipped_steps == 0
    assert accuracy(model, split) >= at_switch - 0.01, (accuracy(model, split), at_switch)
    assert at_switch > 0.5


@pytest.mark.parametrize("reduction", ["modes", "gradual"])
@pytest.mark.parametrize("stop", [150, 400])  # a checkpoint in the warm-up and one in the reduced phase
def test_resume_from_state_dict_gives_identical_weights(digits, stop, reduction):
    def build():
        model = mlp(hidden=64)
        optimizer = CMDOptimizer(model, base=torch.optim.AdamW, modes=10, switch_after=200, snapshot_every=10,
                                 reduction=reduction, lr=1e-3)
        return model, optimizer

    model, optimizer = build()
    train(model, optimizer, digits, 450)

    first, first_opt = build()
    train(first, first_opt, digits, stop)
    model_state, optimizer_state = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    resumed, resumed_opt = build()
    resumed.load_state_dict(model_state)
    resumed_opt.load_state_dict(optimizer_state)
    assert resumed_opt.phase == first_opt.phase
    train(resumed, resumed_opt, digits, 450, start=stop)
    assert resumed_opt.phase == optimizer.phase == "reduced"
    assert same_weights(model, resumed)


def test_lr_scheduler_drives_the_reduced_phase(digits):
    model = mlp(hidden=64)
    optimizer = cmd(model, switch_after=100)
    # full learning rate until step 150, then zero: with lr = 0 nothing may move any more
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 150 else 0.0)
    snapshots = {}
    train(model, optimizer, digits, 170, scheduler=scheduler,
          on_step=lambda s: snapshots.__setitem__(s, [p.detach().clone() for p in model.parameters()]))
    assert optimizer.phase == "reduced" and len(optimizer.param_groups) == 1
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[120], snapshots[140]))
    assert all(torch.equal(a, b) for a, b in zip(snapshots[151], snapshots[170]))


def test_frozen_parameters_stay_put_and_train_once_unfrozen(digits):
    """torch.optim keeps frozen parameters and trains them once ``requires_grad`` is set again, in both
    phases; they are never decomposed (they would be constant columns)."""
    model = mlp(hidden=16)
    model[0].requires_grad_(False)
    optimizer = cmd(model, switch_after=30)
    assert optimizer.trainable_dims == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model[0].weight.clone()
    train(model, optimizer, digits, 20)
    assert torch.equal(model[0].weight, frozen)
    model[0].requires_grad_(True)
    train(model, optimizer, digits, 25, start=20)
    assert not torch.equal(model[0].weight, frozen)  # trains in the warm-up
    train(model, optimizer, digits, 40, start=25)
    assert optimizer.phase == "reduced"
    before = model[0].weight.clone()
    train(model, optimizer, digits, 41, start=40)
    assert not torch.equal(model[0].weight, before)  # and after the switch, in full
    assert optimizer.trainable_dims > model[0].weight.numel()


@pytest.mark.parametrize("phase_steps", [5, 40])
def test_non_finite_gradients_skip_the_step(digits, phase_steps):
    model = mlp(hidden=16)
    optimizer = cmd(model, switch_after=30)
    train(model, optimizer, digits, phase_steps)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(digits[0][:32]), digits[1][:32])
    optimizer.zero_grad()
    loss.backward()
    model[2].weight.grad[3, 4] = float("nan")
    taken = optimizer.steps_taken
    optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.steps_taken == taken
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_tied_parameters_count_once(digits):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(64, 64, bias=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.embed(self.embed(x))))

    model = Tied()
    optimizer = cmd([model.embed.weight, model.embed.weight, *model.head.parameters()], switch_after=30)
    assert optimizer.trainable_dims == 64 * 64 + 64 * 10 + 10
    train(model, optimizer, digits, 50)
    assert optimizer.phase == "reduced"
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == 64 * 64 + 650


def test_parameters_without_gradient_are_left_alone(digits):
    model = mlp(hidden=16)
    unused = nn.Parameter(torch.randn(100))
    optimizer = cmd([*model.parameters(), unused], switch_after=30)
    before = unused.detach().clone()
    with pytest.warns(RuntimeWarning, match="1 parameters did not move during the warm-up"):
        train(model, optimizer, digits, 50)
    assert optimizer.phase == "reduced" and torch.equal(unused, before)


def test_keep_free_trains_the_head_in_full(digits):
    model = mlp(hidden=32)
    optimizer = cmd(model, keep_free="4.*", switch_after=30)
    train(model, optimizer, digits, 60)
    head = 32 * 10 + 10
    assert head < optimizer.trainable_dims <= 10 + head
    before = model[4].weight.detach().clone()
    train(model, optimizer, digits, 61, start=60)
    assert not torch.equal(before, model[4].weight)


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.Adam, dict(lr=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    (torch.optim.RMSprop, dict(lr=1e-3)),
    (torch.optim.Adagrad, dict(lr=1e-2)),
    (lambda groups: torch.optim.SGD(groups, lr=0.05, nesterov=True, momentum=0.9), {}),
])
@pytest.mark.parametrize("reduction", ["modes", None])
def test_any_base_optimizer_trains_in_both_phases(digits, base, kwargs, reduction):
    model = mlp(hidden=32)
    settings = dict(modes=5, snapshot_every=20) if reduction == "modes" else {}
    optimizer = CMDOptimizer(model, base=base, switch_after=300, reduction=reduction, **settings, **kwargs)
    train(model, optimizer, digits, 299)
    full_state = optimizer.state_bytes  # the base's own, before the switch
    train(model, optimizer, digits, 300, start=299)
    at_switch = accuracy(model, digits)
    train(model, optimizer, digits, 500, start=300)
    budget = 5 if reduction == "modes" else sum(p.numel() for p in model.parameters())
    assert optimizer.phase == "reduced" and optimizer.trainable_dims <= budget and optimizer.skipped_steps == 0
    if reduction is None:  # the default keeps less state than the base (none at all with plain SGD, as SGD)
        assert optimizer.state_bytes < full_state or optimizer.state_bytes == full_state == 0
    assert optimizer.switch_report["reduction"] == (reduction or "lowrank")
    assert accuracy(model, digits) >= at_switch - 0.02, (accuracy(model, digits), at_switch)


def test_closure_with_lbfgs(digits):
    model = mlp(hidden=16)
    optimizer = CMDOptimizer(model, base=torch.optim.LBFGS, modes=4, switch_after=3, snapshot_every=1, lr=1,
                             max_iter=5, line_search_fn="strong_wolfe")
    losses = full_batch_losses(model, optimizer, digits[0], digits[1], 8)
    assert optimizer.phase == "reduced"
    assert losses[-1] < losses[3]  # the reduced phase keeps lowering the loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(digits, dtype):
    model = mlp(hidden=32).to(dtype)
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, switch_after=30, lr=0.05)
    data = (digits[0].to(dtype), digits[1], digits[2].to(dtype), digits[3])
    train(model, optimizer, data, 60)
    assert optimizer.phase == "reduced"
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())


def test_compiled_model(digits):
    model = mlp(hidden=16)
    compiled = torch.compile(model, backend="eager")
    optimizer = cmd(compiled, switch_after=30)
    train(compiled, optimizer, digits, 40)
    assert optimizer.phase == "reduced" and optimizer.trainable_dims <= 10


def test_reduced_state_is_five_bytes_per_parameter(digits):
    model = mlp(hidden=32)
    optimizer = cmd(model, switch_after=30)
    train(model, optimizer, digits, 31)
    mode_map = optimizer.state_dict()["cmd"]["phase_state"]["map"]
    per_parameter = sum(t.numel() * t.element_size() for t in mode_map["slopes"] + mode_map["modes"])
    assert per_parameter == 5 * sum(p.numel() for p in model.parameters())
    assert "decomposition" not in optimizer.state_dict()["cmd"]  # 24 bytes per parameter, not kept by default


def test_keep_decomposition_keeps_and_saves_it(digits):
    model = mlp(hidden=32)
    optimizer = cmd(model, switch_after=30, keep_decomposition=True)
    train(model, optimizer, digits, 31)
    d = optimizer.decomposition
    assert d is not None and d.num_params == sum(p.numel() for p in model.parameters())
    resumed = cmd(mlp(hidden=32), switch_after=30, keep_decomposition=True)
    resumed.load_state_dict(roundtrip(optimizer.state_dict()))
    assert torch.equal(resumed.decomposition.assignment, d.assignment)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_accuracy(digits):
    cuda = tuple(t.cuda() for t in digits)
    model = mlp().cuda()
    optimizer = cmd(model)
    train(model, optimizer, cuda, 600)
    assert optimizer.phase == "reduced" and accuracy(model, cuda) > 0.9


def test_gradual_embedding_trains_like_sgd_with_fewer_parameters_each_round(digits):
    model = mlp()
    train(model, torch.optim.SGD(model.parameters(), **SGD), digits, 600)
    sgd_accuracy = accuracy(model, digits)

    model = mlp()
    optimizer = cmd(model, reduction=Gradual(every=2, fraction=0.2))
    total = sum(p.numel() for p in model.parameters())
    dims = {}
    train(model, optimizer, digits, 600, on_step=lambda s: dims.__setitem__(s, optimizer.trainable_dims))
    assert optimizer.phase == "reduced" and optimizer.embedding.rounds == 15
    assert dims[300] == total  # nothing embedded at the switch itself
    # each round embeds 20% of what remains trainable (references never are)
    rounds = [dims[s] for s in range(320, 601, 20)]
    assert all(later < earlier for earlier, later in zip([total, *rounds], rounds))
    assert rounds[-1] < 0.05 * total + optimizer.decomposition.num_modes
    e = optimizer.embedding
    assert not e.embedded[e.references].any()
    assert optimizer.decomposition.num_params == e.num_live  # the fit covers the live parameters only
    # embedded parameters sit exactly on their frozen line through the references' current values
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    line = e.tied_slope * flat[e.references][e.modes.long()] + e.tied_offset
    torch.testing.assert_close(flat[e.embedded], line[e.embedded])
    cmd_accuracy = accuracy(model, digits)
    assert cmd_accuracy > 0.90 and abs(cmd_accuracy - sgd_accuracy) <= 0.02, (cmd_accuracy, sgd_accuracy)


def test_gradual_state_is_rejected_by_a_modes_optimizer(digits):
    model = mlp(hidden=32)
    optimizer = cmd(model, switch_after=20, snapshot_every=5, reduction="gradual")
    train(model, optimizer, digits, 30)
    with pytest.raises(ValueError, match="saved with reduction='gradual'"):
        cmd(mlp(hidden=32), switch_after=20, snapshot_every=5).load_state_dict(roundtrip(optimizer.state_dict()))


@pytest.mark.parametrize("reduction", ["modes", "gradual"])
def test_state_dict_round_trip_in_place_at_any_phase(digits, reduction):
    """accelerate's prepare() round-trips the state_dict through the same optimizer, at any phase."""
    def run(round_trip_at):
        model = mlp(hidden=32)
        optimizer = cmd(model, switch_after=60, snapshot_every=10, reduction=reduction)
        saved = {}
        for stop in (40, 90):  # in the warm-up, then after the switch
            train(model, optimizer, digits, stop, start=saved.get("start", 0))
            saved["start"] = stop
            if stop in round_trip_at:
                optimizer.load_state_dict(roundtrip(optimizer.state_dict()))
        train(model, optimizer, digits, 130, start=90)
        return model, optimizer

    plain, _ = run(())
    tripped, optimizer = run((40, 90))
    assert optimizer.phase == "reduced" and optimizer.switch_report["step"] == 60
    assert same_weights(plain, tripped)


def test_warmup_state_loads_into_an_optimizer_past_its_switch(digits):
    model, other = mlp(hidden=32), mlp(hidden=32)
    optimizer, late = cmd(model, switch_after=60, snapshot_every=10), cmd(other, switch_after=60, snapshot_every=10)
    train(model, optimizer, digits, 30)
    train(other, late, digits, 80)
    assert late.phase == "reduced"
    other.load_state_dict(model.state_dict())
    late.load_state_dict(roundtrip(optimizer.state_dict()))
    assert late.phase == "warmup" and late.steps_taken == 30
    train(model, optimizer, digits, 100, start=30)
    train(other, late, digits, 100, start=30)
    assert same_weights(model, other)


def test_switch_report_measures_the_decomposition(digits):
    model = mlp(hidden=32)
    optimizer = cmd(model, switch_after=100, snapshot_every=10, keep_decomposition=True)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    trajectory = [flat()]
    train(model, optimizer, digits, 100, on_step=lambda s: s % 10 or trajectory.append(flat()))
    report, d = optimizer.switch_report, optimizer.decomposition
    assert report["modes"] == d.num_modes and report["snapshots"] == len(trajectory) == 11
    assert report["decomposed_params"] == sum(p.numel() for p in model.parameters())
    trajectory = torch.stack(trajectory)
    assert report["relative_error"] == pytest.approx(float(d.relative_error(trajectory).mean()), rel=1e-5)
    assert report["explained_variance"] == pytest.approx(d.explained_variance(trajectory), rel=1e-5)
    assert 0 < report["relative_error"] < 0.2 and 0.5 < report["explained_variance"] <= 1


def test_keep_free_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="keep_free pattern 'classifier.\\*' matches no parameter name"):
        cmd(mlp(hidden=8), keep_free=["classifier.*"])


def test_deprecated_argument_names_still_work_with_a_warning(digits):
    with pytest.warns(FutureWarning, match="warmup_steps is deprecated, use switch_after"):
        old = CMDOptimizer(mlp(hidden=8), warmup_steps=30, lr=0.1)
    assert old.switch_after == 30
    with pytest.warns(FutureWarning, match="reduction=Gradual"):
        gradual = CMDOptimizer(mlp(hidden=8), switch_after=30, embed="gradual", embed_every=3, embed_fraction=0.5)
    assert isinstance(gradual.reduction, Gradual) and (gradual.reduction.every, gradual.reduction.fraction) == (3, 0.5)
    with pytest.warns(FutureWarning):
        modes = CMDOptimizer(mlp(hidden=8), switch_after=30, max_coefficient=4.0)
    assert isinstance(modes.reduction, Modes) and modes.reduction.max_slope == 4.0
    with pytest.raises(TypeError, match="pass switch_after only"):
        CMDOptimizer(mlp(hidden=8), switch_after=30, warmup_steps=30)


def test_snapshots_in_a_file_train_like_snapshots_in_memory_and_resume(digits, tmp_path):
    def build(folder):
        model = mlp(hidden=32)
        return model, cmd(model, switch_after=60, snapshot_every=10, snapshot_dir=folder)

    memory_model, memory_opt = build(None)
    file_model, file_opt = build(str(tmp_path))
    assert file_opt.snapshot_bytes == 0 and len(list(tmp_path.iterdir())) == 1
    train(memory_model, memory_opt, digits, 30)
    train(file_model, file_opt, digits, 30)
    saved = roundtrip(file_opt.state_dict())  # names a lasting link to the 4 rows so far
    train(memory_model, memory_opt, digits, 90, start=30)
    train(file_model, file_opt, digits, 90, start=30)
    assert file_opt.phase == "reduced" and same_weights(memory_model, file_model)
    assert [p.name.endswith("-rows4.bin") for p in tmp_path.iterdir()] == [True]  # the working file is gone
    resumed_model, resumed_opt = build(str(tmp_path))
    first, _ = build(None)
    train(first, cmd(first, switch_after=60, snapshot_every=10), digits, 30)
    resumed_model.load_state_dict(first.state_dict())
    resumed_opt.load_state_dict(saved)
    train(resumed_model, resumed_opt, digits, 90, start=30)
    assert same_weights(memory_model, resumed_model)


def test_the_finiteness_check_finds_nan_and_inf_in_any_dtype_and_passes_large_half_precision_gradients():
    from cmd_optim.optim._params import all_finite

    big_half = torch.full((4096,), 2000.0, dtype=torch.float16)  # its sum and its norm are beyond float16's range
    assert all_finite([big_half, torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), None])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.ones(1000, dtype=dtype)
            t[517] = bad
            assert not all_finite([torch.ones(5), t])
    assert all_finite([])
    near_limit = torch.full((8,), 3e38)  # finite, though its float32 sum is not
    assert all_finite([near_limit])
    for bad in (complex(0, math.inf), complex(math.nan, 0)):
        assert not all_finite([torch.ones(3), torch.tensor([1 + 0j, bad])])
    assert all_finite([torch.ones(2, dtype=torch.complex64), torch.ones(3).T])
    gradients = [torch.randn(6, 5), torch.randn(7).to(torch.bfloat16), torch.randn(5, 6).T]
    before = [(g.clone(), g._version) for g in gradients]
    all_finite(gradients)
    assert all(torch.equal(g, b) and g._version == v for g, (b, v) in zip(gradients, before))  # left untouched
