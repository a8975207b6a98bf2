"""One test per defect of the project's reliability audits (D1-D25) and of its newcomer trial (N1-N9), each
written from the audit's reproduction of the defect."""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cmd_optim import CMDOptimizer, Gradual, Modes, decompose
from tests._helpers import full_batch_losses, mlp, roundtrip, same_weights
from tests._helpers import train as train_on

KW = dict(modes=4, switch_after=30, snapshot_every=5, lr=0.05, momentum=0.9, reduction="modes")


def small(hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))


_X = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
_Y = (_X[:, :4] + 0.5 * torch.randn(256, 4, generator=torch.Generator().manual_seed(1))).argmax(1)


def train(model, opt, steps, start=0, scheduler=None):
    for step in range(start, steps):
        index = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(_X[index]), _Y[index]).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def snapshot(opt):
    """Everything a failed load must leave as it was."""
    return {"phase": opt.phase, "steps": opt.steps_taken, "skipped": opt.skipped_steps,
            "inner": opt.inner_optimizer, "state": roundtrip(opt.state_dict()),
            "groups": opt.param_groups, "group_ids": [id(g) for g in opt.param_groups]}


def assert_unchanged(opt, before):
    assert opt.phase == before["phase"] and opt.steps_taken == before["steps"]
    assert opt.skipped_steps == before["skipped"] and opt.inner_optimizer is before["inner"]
    assert opt.param_groups is before["groups"] and [id(g) for g in opt.param_groups] == before["group_ids"]
    after = opt.state_dict()
    assert _equal(after, before["state"])


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def foreign_states():
    """Every kind of state the audit fed to load_state_dict that must be refused."""
    other = small(hidden=32)
    other_opt = CMDOptimizer(other, **KW)
    states = {"another model, warm-up": other_opt.state_dict()}
    train(other, other_opt, 40)
    states["another model, reduced"] = other_opt.state_dict()
    m = small()
    o = CMDOptimizer(m, **KW)
    train(m, o, 12)
    warm = o.state_dict()
    def with_phase_state(state, **changes):
        phase_state = {k: v for k, v in state["cmd"]["phase_state"].items() if k not in changes}
        phase_state.update({k: v for k, v in changes.items() if v is not None})
        return {**state, "cmd": {**state["cmd"], "phase_state": phase_state}}

    states["no snapshots"] = with_phase_state(warm, snapshots=None)
    states["snapshot_every 3"] = CMDOptimizer(small(), **{**KW, "snapshot_every": 3}).state_dict()
    states["switch_after 20"] = CMDOptimizer(small(), **{**KW, "switch_after": 20}).state_dict()
    doubled = torch.cat([warm["cmd"]["phase_state"]["snapshots"]] * 2)
    states["a snapshot too many"] = with_phase_state(warm, snapshots=doubled)
    train(m, o, 40, start=12)
    reduced = o.state_dict()
    states["reduced without coefficients"] = with_phase_state(reduced, coefficients=None)
    flipped = copy.deepcopy(reduced)
    flipped["cmd"]["phase_state"]["map"]["modes"][0].view(-1)[0] = 250  # a flipped byte that torch.load still accepts
    states["flipped mode byte"] = flipped
    nan = copy.deepcopy(reduced)
    nan["cmd"]["phase_state"]["map"]["slopes"][0].view(-1)[0] = float("nan")
    states["NaN slope"] = nan
    inf_limit = copy.deepcopy(reduced)
    inf_limit["cmd"]["phase_state"]["speed_limit"][0] = float("nan")
    states["NaN speed limit"] = inf_limit
    states["plain SGD"] = torch.optim.SGD(small().parameters(), lr=0.1).state_dict()
    adam = CMDOptimizer(small(), base=torch.optim.Adam, modes=4, switch_after=30, snapshot_every=5, lr=1e-3)
    states["Adam state"] = adam.state_dict()
    gradual_model = small()
    gradual = CMDOptimizer(gradual_model, **{**KW, "reduction": "gradual"})
    train(gradual_model, gradual, 40)
    states["gradual reduced"] = gradual.state_dict()
    return states


FOREIGN = foreign_states()


@pytest.mark.parametrize("at", [5, 40])  # a warm-up and a reduced-phase optimizer
@pytest.mark.parametrize("name", list(FOREIGN))
def test_d1_d5_d6_d11_d25_a_failed_load_leaves_the_optimizer_exactly_as_it_was(name, at):
    m = small()
    opt = CMDOptimizer(m, **KW)
    train(m, opt, at)
    before = snapshot(opt)
    with pytest.raises((ValueError, KeyError, TypeError)):
        opt.load_state_dict(copy.deepcopy(FOREIGN[name]))
    assert_unchanged(opt, before)
    reference, reference_opt = small(), CMDOptimizer(small(), **KW)  # and it trains on as if nothing happened
    reference.load_state_dict(m.state_dict())
    reference_opt = CMDOptimizer(reference, **KW)
    reference_opt.load_state_dict(roundtrip(opt.state_dict()))
    train(m, opt, at + 10, start=at)
    train(reference, reference_opt, at + 10, start=at)
    assert same_weights(m, reference)


def test_d5_other_snapshot_settings_are_named():
    state = CMDOptimizer(small(), **{**KW, "snapshot_every": 3}).state_dict()
    with pytest.raises(ValueError, match="saved with snapshot_every=3, this optimizer has snapshot_every=5"):
        CMDOptimizer(small(), **KW).load_state_dict(state)


def test_d25_base_optimizer_mismatch_is_named():
    state = CMDOptimizer(small(), base=torch.optim.Adam, modes=4, switch_after=30, snapshot_every=5).state_dict()
    with pytest.raises(ValueError, match="saved with base optimizer Adam, this optimizer uses SGD"):
        CMDOptimizer(small(), **KW).load_state_dict(state)


def test_d2_a_parameter_without_momentum_does_not_drop_the_others():
    m = small()
    unused = nn.Parameter(torch.zeros(3))  # never in the loss: no momentum buffer
    opt = CMDOptimizer([*m.parameters(), unused], **KW)
    with pytest.warns(RuntimeWarning, match=r"1 parameters did not move during the warm-up \(group0.param4\)"):
        train(m, opt, 30)
    assert opt.phase == "reduced"
    state = opt.inner_optimizer.state[opt.mode_coefficients[0]]
    assert "momentum_buffer" in state and bool(state["momentum_buffer"].abs().sum() > 0)


@pytest.mark.parametrize("reduction", ["modes", "gradual"])
@pytest.mark.parametrize("saved_at", [10, 40])
def test_d3_schedules_reach_the_stepping_optimizer_after_a_resume(reduction, saved_at):
    def build():
        m = small()
        opt = CMDOptimizer(m, **{**KW, "reduction": reduction})
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    m, opt, sched = build()
    train(m, opt, saved_at, scheduler=sched)
    saved = roundtrip({"m": m.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()})
    train(m, opt, 60, start=saved_at, scheduler=sched)
    m2, opt2, sched2 = build()
    m2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    sched2.load_state_dict(saved["s"])
    assert opt2.param_groups is opt2.inner_optimizer.param_groups or opt2.phase == "reduced"
    train(m2, opt2, 60, start=saved_at, scheduler=sched2)
    assert same_weights(m, m2)
    for group in opt2.param_groups:  # what a scheduler does
        group["lr"] = 0.0
    before = [p.detach().clone() for p in m2.parameters()]
    train(m2, opt2, 61, start=60)
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))


def test_d4_decompose_near_the_float32_limit_gives_a_finite_fit_or_a_clear_error():
    t = torch.linspace(0, 1, 8)
    trajectory = torch.stack([t * 1e20, 2 * t * 1e20 + 1, t * t * 1e20], 1)
    with pytest.raises(ValueError, match="too large for torch.float32 statistics"):
        decompose(trajectory, modes=2, samples=3)
    assert torch.isfinite(decompose(trajectory.double(), modes=2, samples=3).a).all()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (math.nan, ValueError),
                                          (None, TypeError), (math.inf, ValueError)])
def test_d7_max_slope_is_checked_at_construction(value, error):
    with pytest.raises(error, match="max_slope"):
        CMDOptimizer(small(), **{**KW, "reduction": Modes(max_slope=value)})


@pytest.mark.parametrize("cause", ["lr=0", "no backward"])
def test_d8_a_warmup_in_which_nothing_moved_is_reported(cause):
    m = small()
    opt = CMDOptimizer(m, **{**KW, "lr": 0.0 if cause == "lr=0" else 0.05})
    reason = "moved none of the sampled parameters" if cause == "lr=0" else "no parameter got a gradient"
    with pytest.raises(RuntimeError, match=reason):
        for step in range(30):
            if cause == "lr=0":
                train(m, opt, step + 1, start=step)
            else:
                opt.step()
    assert opt.phase == "warmup" and opt.steps_taken == 30
    roundtrip(opt.state_dict())  # it can be saved


def test_d9_a_non_finite_learning_rate_is_refused():
    with pytest.raises(ValueError, match="lr=nan for the base optimizer is not finite"):
        CMDOptimizer(small(), modes=4, switch_after=30, snapshot_every=5, lr=math.nan)


@pytest.mark.parametrize("phase_steps", [3, 12])
def test_d10_non_finite_gradients_in_an_lbfgs_re_evaluation_never_reach_the_weights(phase_steps):
    m = small()
    opt = CMDOptimizer(m, base=torch.optim.LBFGS, modes=4, switch_after=10, snapshot_every=2, lr=0.1, max_iter=5)
    calls = {"n": 0, "poison": False}
    labels = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(5))  # far from solved in 12 steps

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(_X), labels)
        loss.backward()
        calls["n"] += 1
        if calls["poison"] and calls["n"] > 1:  # the re-evaluations inside the step
            next(m.parameters()).grad.fill_(math.nan)
        return loss

    for _ in range(phase_steps):
        opt.step(closure)
    before = [p.detach().clone() for p in m.parameters()]
    calls.update(n=0, poison=True)
    opt.step(closure)
    assert calls["n"] > 1 and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    calls.update(poison=False)
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("at", [10, 40])
def test_d12_deepcopy_and_pickle_are_whole(at):
    m = small()
    opt = CMDOptimizer(m, **KW)
    train(m, opt, at)
    for twin_model, twin in (copy.deepcopy((m, opt)), pickle.loads(pickle.dumps((m, opt)))):
        train(twin_model, twin, at + 5, start=at)
        assert twin.steps_taken == at + 5


def test_d13_a_switch_that_raises_can_be_saved_and_retried(monkeypatch):
    import cmd_optim.optim.decomposed as cmd_module

    m = small()
    opt = CMDOptimizer(m, **KW)
    real = cmd_module.fit_slopes  # what the switch of the mode reduction calls
    monkeypatch.setattr(cmd_module, "fit_slopes", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        train(m, opt, 30)
    assert opt.phase == "warmup" and opt.steps_taken == 30
    saved = roundtrip(opt.state_dict())
    weights = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(MemoryError):  # retried before anything moves
        train(m, opt, 31, start=30)
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters())) and opt.steps_taken == 30
    monkeypatch.setattr(cmd_module, "fit_slopes", real)
    train(m, opt, 31, start=30)
    assert opt.phase == "reduced" and opt.switch_report["step"] == 30 and opt.steps_taken == 31
    again = CMDOptimizer(small(), **KW)
    again.load_state_dict(saved)
    assert again.phase == "warmup" and again.steps_taken == 30


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(snapshot_dtype=torch.int8), ValueError, "snapshot_dtype must be a floating-point dtype"),
    (dict(snapshot_dtype=torch.bool), ValueError, "snapshot_dtype must be a floating-point dtype"),
    (dict(snapshot_dtype="float16"), TypeError, "snapshot_dtype must be a torch.dtype"),
    (dict(snapshot_device="meta"), ValueError, "snapshot_device must hold real data"),
    (dict(snapshot_device="foo"), ValueError, "snapshot_device='foo' is not a device"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed="abc"), TypeError, "seed must be an integer"),
    (dict(seed=2**70), ValueError, "seed must be an integer in"),
    (dict(modes=10**6), ValueError, r"modes must be an integer in \[1, 256\]"),
    (dict(modes=4, samples=3), ValueError, r"samples must be >= modes \(4\)"),
    (dict(keep_free=None), TypeError, "keep_free must be a pattern or an iterable"),
    (dict(keep_free=[2]), TypeError, "keep_free patterns must be strings, got 2"),
    (dict(reduction=Gradual), ValueError, "reduction must be"),
    (dict(base=torch.optim.Optimizer), TypeError, "abstract base class"),
    (dict(lr="0.1"), TypeError, "base=SGD rejects its arguments"),
])
def test_d14_d15_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, message):
    settings = {**KW, **kwargs}
    with pytest.raises(error, match=message):
        CMDOptimizer(small(), **settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_d15_a_missing_gpu_is_named():
    with pytest.raises(ValueError, match="snapshot_device='cuda': no such device"):
        CMDOptimizer(small(), snapshot_device="cuda", **KW)


@pytest.mark.parametrize("model, message", [(None, "got NoneType"), (nn.Linear, "got type"),
                                            (torch.zeros(3), "got Tensor")])
def test_d15_a_bad_model_is_named(model, message):
    with pytest.raises(TypeError, match=f"model must be an nn.Module or an iterable.*{message}"):
        CMDOptimizer(model, **KW)


def test_d14_zero_element_models_and_float16_overflow_fail_at_construction():
    with pytest.raises(ValueError, match="every parameter has 0 elements"):
        CMDOptimizer([nn.Parameter(torch.zeros(0))], **KW)
    m = small()
    with torch.no_grad():
        m[0].weight[0, 0] = 70000.0
    with pytest.raises(OverflowError, match="beyond snapshot_dtype=torch.float16's range"):
        CMDOptimizer(m, snapshot_dtype=torch.float16, **KW)


def test_d16_sparse_gradients_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="makes sparse gradients"):
        CMDOptimizer(model, **KW)
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = CMDOptimizer([embedding.weight, nn.Parameter(torch.ones(2))], **KW)
    embedding(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_d17_meta_parameters_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        CMDOptimizer(nn.Linear(4, 2, device="meta"), **KW)


def test_d19_numpy_integers_are_integers():
    opt = CMDOptimizer(small(), modes=np.int64(4), switch_after=np.int64(30), snapshot_every=np.int32(5), lr=0.05)
    assert (opt.reduction.modes, opt.switch_after, opt.snapshot_every) == (4, 30, 5)
    assert type(opt.reduction.modes) is int and type(opt.reduction.snapshot_every) is int


def test_d20_a_bare_string_is_one_pattern():
    opt = CMDOptimizer(small(), keep_free="2.weight", **KW)
    assert opt.trainable_dims == sum(p.numel() for p in small().parameters())
    m = small()
    opt = CMDOptimizer(m, keep_free="2.*", **KW)
    train(m, opt, 30)
    assert opt.trainable_dims <= 4 + 16 * 4 + 4


def test_d21_a_tied_weight_answers_to_every_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(torch.tanh(self.body(self.embed(ids))))

    opt = CMDOptimizer(Tied(), keep_free=["lm_head.*"], **KW)
    assert opt.trainable_dims == 10 * 8 + 8 * 8 + 8


def test_d22_booleans_are_not_numbers():
    with pytest.raises(TypeError, match="fraction must be a real number, got True"):
        Gradual(fraction=True)
    with pytest.raises(TypeError, match="modes must be an integer, got True"):
        CMDOptimizer(small(), **{**KW, "modes": True})


def test_d23_an_all_constant_trajectory_gives_zero_slopes():
    trajectory = torch.full((5, 30), 0.1) + torch.arange(30.0) / 7
    d = decompose(trajectory, modes=3, samples=10)
    assert torch.all(d.a == 0) and torch.equal(d.b, trajectory[0])


def test_d24_gradual_leaves_parameters_without_a_gradient_alone():
    m = small()
    extra = nn.Linear(8, 4)  # used on some steps only
    opt = CMDOptimizer([*m.parameters(), *extra.parameters()], **{**KW, "reduction": Gradual(every=1, fraction=0.5)})
    for step in range(50):
        index = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        use_extra = step < 35
        before = extra.weight.detach().clone()
        opt.zero_grad()
        out = m(_X[index]) + (extra(_X[index]) if use_extra else 0)
        nn.functional.cross_entropy(out, _Y[index]).backward()
        opt.step()
        if not use_extra:
            assert torch.equal(extra.weight, before), step
    assert opt.embedding.num_embedded > 0


def test_n1_channels_last_models_train_after_the_switch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 2)).to(
        memory_format=torch.channels_last)
    opt = CMDOptimizer(model, base=torch.optim.SGD, switch_after=20, lr=0.05)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (16,))
    for step in range(25):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 24:
            before = model[0].weight.detach().clone()
        opt.step()
    assert opt.phase == "reduced" and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(before, model[0].weight)


def test_n2_lbfgs_weights_stay_finite_in_the_reduced_phase(digits):
    model = mlp(hidden=32)
    opt = CMDOptimizer(model, base=torch.optim.LBFGS, lr=1.0, max_iter=1, line_search_fn="strong_wolfe",
                       switch_after=10, snapshot_every=2, modes=10)
    losses = full_batch_losses(model, opt, digits[0], digits[1], 60)
    assert opt.phase == "reduced" and opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[10]


def test_n3_a_compiled_step_survives_the_switch(digits):
    model = mlp(hidden=16)
    opt = CMDOptimizer(model, base=torch.optim.SGD, switch_after=20, lr=0.05, momentum=0.9)
    step = torch.compile(opt.step, backend="eager")
    for i in range(30):
        index = torch.randint(0, len(digits[0]), (64,), generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        nn.functional.cross_entropy(model(digits[0][index]), digits[1][index]).backward()
        step()
    assert opt.phase == "reduced" and opt.steps_taken == 30


def test_n4_bfloat16_parameters_keep_their_reduced_phase_moves(digits):
    """Added step by step, 91% of the moves rounded away in bf16; now as many weights change as in float32."""
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = mlp(hidden=64).to(dtype)
        opt = CMDOptimizer(model, base=torch.optim.SGD, switch_after=150, lr=0.05, momentum=0.9)
        data = (digits[0].to(dtype), digits[1], digits[2].to(dtype), digits[3])
        train_on(model, opt, data, 160)
        at = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        train_on(model, opt, data, 400, start=160)
        now = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        changed[dtype] = float((now != at).float().mean())
    assert changed[torch.bfloat16] > 0.5 * changed[torch.float32], changed


def test_n7_training_that_ends_before_the_switch_warns():
    transformers = pytest.importorskip("transformers")
    from cmd_optim.integrations.hf import CMDCallback

    m = small()
    opt = CMDOptimizer(m, **KW)
    train(m, opt, 10)
    state = transformers.TrainerState()
    with pytest.warns(UserWarning, match="before CMD's switch at step 30"):
        CMDCallback().on_train_end(None, state, transformers.TrainerControl(), optimizer=opt)
    train(m, opt, 31, start=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CMDCallback().on_train_end(None, state, transformers.TrainerControl(), optimizer=opt)


def test_n9_parameters_frozen_at_construction_train_once_unfrozen():
    m = small()
    m[0].requires_grad_(False)
    opt = CMDOptimizer(m, **KW)
    frozen = m[0].weight.detach().clone()
    train(m, opt, 10)
    assert torch.equal(frozen, m[0].weight)
    m[0].requires_grad_(True)
    train(m, opt, 40, start=10)
    assert not torch.equal(frozen, m[0].weight) and opt.phase == "reduced"
