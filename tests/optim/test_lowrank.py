"""The low-rank reduction: its plan of ranks, what a step moves, refreshes, weight decay, its public view,
and that it keeps learning after the switch."""


import pytest
import torch
from torch import nn

from benchmarks import datasets
from cmd_optim import CMDOptimizer, LowRank
from cmd_optim.optim.lowrank import plan_matrices, spread_by_spectrum
from tests._helpers import accuracy, mlp, roundtrip, train


def test_ranks_keep_each_matrix_state_within_its_share_and_small_sides_train_in_full():
    shapes = [(256, 64), (256, 256), (10, 256), (64, 3000)]
    plans = plan_matrices(["a", "b", "head", "table"], shapes, [2, 2, 2, 2], 0.25, None, 16)
    assert [p.rank for p in plans][2] == 0  # a 10-row head trains in full
    for plan, (m, n) in zip(plans, shapes):
        if plan.projected:
            assert plan.state_bytes() <= 0.25 * 8 * m * n
            assert plan.state_bytes() > 0.2 * 8 * m * n  # the largest rank within the share
    sgd = plan_matrices(["b"], [(256, 256)], [1], 0.25, None, 16)[0]  # momentum only: 4 bytes per parameter
    assert sgd.state_bytes() <= 0.25 * 4 * 256 * 256 and sgd.rank == 256 * 256 // (4 * 512)
    fixed = plan_matrices(["a", "b"], [(256, 64), (40, 30)], [2, 2], 0.25, 48, 16)
    assert [p.rank for p in fixed] == [48, 0]  # rank 48 reaches the 30-wide side: trained in full
    stateless = plan_matrices(["a", "b"], [(256, 64)] * 2, [0, 0], 0.25, None, 16)
    assert [p.rank for p in stateless] == [0, 0]  # plain SGD keeps nothing: nothing to save by projecting


def test_spectrum_allocation_deals_the_same_state_to_the_matrices_whose_energy_is_spread():
    shapes = [(256, 256), (256, 256), (10, 256)]
    plans = plan_matrices(["peaked", "flat", "head"], shapes, [2, 2, 2], 0.25, None, 16)
    peaked = torch.cat([torch.tensor([10.0, 5.0, 2.0]), torch.full((253,), 1e-3)])
    spectra = [peaked, torch.linspace(1.0, 0.5, 256), None]
    dealt = spread_by_spectrum(plans, spectra)
    assert sum(p.state_bytes() for p in dealt) <= sum(p.state_bytes() for p in plans)
    assert sum(p.state_bytes() for p in dealt) > 0.95 * sum(p.state_bytes() for p in plans)
    assert dealt[0].rank == 3 and dealt[1].rank > plans[1].rank  # the peaked one needs only its 3 directions
    assert dealt[2] == plans[2]  # trained in full: untouched
    assert all(1 <= p.rank < 256 for p in dealt[:2])
    with pytest.raises(ValueError, match="allocate must be"):
        LowRank(allocate="greedy")
    with pytest.raises(ValueError, match="fixed rank"):
        LowRank(allocate="spectrum", rank=8)


def test_spectrum_allocation_trains_through_the_switch_within_the_shares_state(digits):
    states, ranks = [], []
    for allocate in ("share", "spectrum"):
        model = mlp()
        opt = _cmd(model, base=torch.optim.AdamW, switch_after=20, reduction=LowRank(allocate=allocate))
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, digits, steps=40)
        assert opt.phase == "reduced" and all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        states.append(opt.state_bytes)
        ranks.append([m["rank"] for m in opt.switch_report["matrices"]])
    assert states[1] <= states[0] and ranks[1] != ranks[0]


def _cmd(model, base=torch.optim.SGD, switch_after=30, **kwargs):
    settings = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    settings.update(kwargs)
    return CMDOptimizer(model, base=base, switch_after=switch_after, **settings)


def test_with_plain_sgd_the_residual_makes_the_reduced_phase_plain_sgd(digits):
    model, reference = mlp(hidden=64), mlp(hidden=64)
    optimizer = _cmd(model, lr=0.05, momentum=0.0, reduction=LowRank(rank=6, refresh_every=7))
    train(model, optimizer, digits, 50)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.05), digits, 50)
    assert optimizer.phase == "reduced" and any(plan.projected for plan in optimizer.reduced_phase.plans)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _one_step_moves(digits, reduction, decay=None):
    """Plain SGD (lr 0.05) with ``reduction`` through the switch (and ``decay``: the rate's factor from then on,
    set by a LambdaLR); each parameter's move in the next step over its gradient times the rate, and the
    projected matrices."""
    model = mlp(hidden=64)
    optimizer = _cmd(model, lr=0.05, momentum=0.0, reduction=reduction)
    scheduler = None if decay is None else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if step <= 31 else decay)
    train(model, optimizer, digits, 32, scheduler=scheduler)
    rate = optimizer.param_groups[0]["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(digits[0][:64]), digits[1][:64]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    projected = set(optimizer.reduced_phase.projected)
    assert len(projected) == 2
    return [float((start - p.detach()).norm() / (rate * g).norm()) for p, start, g in
            zip(model.parameters(), before, grads)], [p in projected for p in model.parameters()]


def test_a_step_scale_moves_the_projected_matrices_that_many_sgd_steps_and_the_rest_one(digits):
    """Plain SGD with a fixed rank moves every projected matrix as SGD at ``step_scale`` times the rate (capped
    at the schedule's peak: ``min(step_scale, initial_lr / lr)``, at least 1), what trains in full at the rate."""
    cases = [(LowRank(rank=6, step_scale=2.0, peak_cap=False), None, 2.0),
             (LowRank(rank=6), None, 1.0),  # no scheduler: no peak above the rate, the base's step
             (LowRank(rank=6), 1.0, 1.0),  # a constant schedule: the base's step
             (LowRank(rank=6), 0.5, 2.0),  # half the peak: twice the step, at the peak rate
             (LowRank(rank=6), 0.1, 4.0)]  # a tenth: step_scale's 4
    for reduction, decay, gain in cases:
        ratios, projected = _one_step_moves(digits, reduction, decay)
        for ratio, inside in zip(ratios, projected):
            assert ratio == pytest.approx(gain if inside else 1.0, rel=1e-4), (reduction, decay)
    with pytest.raises(ValueError, match="step_scale"):
        LowRank(step_scale=0.0)
    with pytest.raises(TypeError, match="step_scale"):
        LowRank(step_scale="2")
    with pytest.raises(TypeError, match="peak_cap"):
        LowRank(peak_cap=1)


def test_at_a_constant_rate_the_default_step_is_the_base_step_bit_for_bit(digits):
    runs = []
    for reduction in (LowRank(), LowRank(step_scale=1.0)):
        model = mlp(hidden=64)
        optimizer = _cmd(model, base=torch.optim.AdamW, reduction=reduction)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        train(model, optimizer, digits, 45, scheduler=scheduler)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_without_the_residual_each_matrix_moves_inside_its_basis(digits):
    model = mlp(hidden=64)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=50, residual=False))
    train(model, optimizer, digits, 30)
    assert optimizer.snapshot_bytes == 0  # it records nothing in the warm-up
    phase = optimizer.reduced_phase
    before = [p.detach().clone() for p in phase.projected]
    train(model, optimizer, digits, 45, start=30)
    for index, (p, start) in enumerate(zip(phase.projected, before)):
        change = (p.detach() - start).reshape(phase.map.entries[index].shape)
        inside = phase.map.lift(index, phase.map.project(index, change))
        torch.testing.assert_close(inside, change, atol=1e-5, rtol=1e-4)
    biases = [model[0].bias, model[2].bias]
    assert all(p.grad is not None for p in biases)


def test_a_refresh_takes_the_top_directions_of_its_step_gradient_and_rotates_the_momentum(digits):
    model = mlp(hidden=64)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=5))
    train(model, optimizer, digits, 35)  # five reduced steps: the next one refreshes
    phase = optimizer.reduced_phase
    assert phase.window_steps == 0 and phase.refreshes == 1
    index = 1  # the 64 x 64 hidden layer
    p = phase.projected[index]
    momentum = optimizer.inner_optimizer.state[phase.cores[index]]["momentum_buffer"].clone()
    old = phase.map.bases[index].clone()
    x, y = digits[0][:64], digits[1][:64]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = p.grad.detach().clone()
    optimizer.step()
    new = phase.map.bases[index]
    rank = new.shape[1]
    expected = torch.linalg.svd(grad.double() if p.shape[0] <= p.shape[1] else grad.double().T).U[:, :rank]
    torch.testing.assert_close((new.double().T @ expected).abs().sum(0), torch.ones(rank, dtype=torch.double),
                               atol=0.05, rtol=0)  # the same subspace, up to signs and near-ties
    assert not torch.equal(new, old)
    rotated = (new.T @ old) @ momentum if p.shape[0] <= p.shape[1] else momentum @ (new.T @ old).T
    low = phase.map.project(index, grad)
    torch.testing.assert_close(optimizer.inner_optimizer.state[phase.cores[index]]["momentum_buffer"],
                               0.9 * rotated + low, rtol=1e-4, atol=1e-6)  # rotated, then one step further


def test_the_exchange_shows_a_hook_the_subspaces_and_rebases_its_state_through_a_refresh(digits):
    """What a communication hook reads of the low-rank phase (cmd_optim.optim.exchange): the projection, lift
    and core shape of each projected matrix, when a refresh is due, this rank's stashed gradient as its source,
    and a core-shaped tensor rotated into the new basis once; a loaded state is a new attachment."""
    model = mlp(hidden=64)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=5))
    exchange = optimizer.exchange
    train(model, optimizer, digits, 34)
    phase = optimizer.reduced_phase
    assert exchange.low_rank and exchange.attachments == 1 and not exchange.refresh_due
    assert [exchange.projects(p) for p in model.parameters()] == [phase.subspace_of(p) is not None
                                                                  for p in model.parameters()]
    index, p = 1, phase.projected[1]
    kept = torch.randn(phase.map.core_shape(index))
    assert exchange.core_shape(p) == tuple(exchange.project(p, torch.randn_like(p)).shape) == kept.shape
    torch.testing.assert_close(exchange.project(p, exchange.lift(p, kept)), kept)
    assert torch.equal(exchange.rebase(p, kept), kept)  # no refresh yet
    train(model, optimizer, digits, 35, start=34)
    assert exchange.refresh_due
    old = exchange.lift(p, kept)
    x, y = digits[0][:64], digits[1][:64]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    rank = phase.map.bases[index].shape[1]  # what a hook would stash: this rank's gradient, not the .grad
    own = torch.randn(p.shape[0], rank) @ torch.randn(rank, p.shape[1]) + 1e-3 * torch.randn_like(p)
    exchange.stash(p, own)
    optimizer.step()
    new = phase.map.bases[index]
    expected = torch.linalg.svd(own.double() if p.shape[0] <= p.shape[1] else own.double().T).U[:, :rank]
    torch.testing.assert_close(torch.linalg.svdvals(new.double().T @ expected), torch.ones(rank, dtype=torch.double),
                               atol=1e-3, rtol=0)  # the stashed gradient's directions
    rebased = exchange.rebase(p, kept)
    torch.testing.assert_close(exchange.lift(p, rebased), exchange.lift(p, exchange.project(p, old)))
    assert torch.equal(exchange.rebase(p, rebased), rebased)  # rotated once
    optimizer.load_state_dict(optimizer.state_dict())
    assert exchange.attachments == 2 and exchange.low_rank


def test_decoupled_weight_decay_shrinks_the_weights_as_adamw_does(digits):
    model = mlp(hidden=64)
    optimizer = _cmd(model, base=torch.optim.AdamW, lr=1e-2, weight_decay=0.5, betas=(0.0, 0.999))
    train(model, optimizer, digits, 30)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # nothing but the decay moves the weights (no first moment: beta1 = 0)
    optimizer.step()
    core_groups = optimizer.reduced_phase.core_groups
    assert core_groups and all(group["weight_decay"] == 0.0 for group in core_groups)
    for p, start in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), start * (1 - 1e-2 * 0.5), rtol=1e-6, atol=1e-7)


def test_coupled_weight_decay_with_plain_sgd_is_still_plain_sgd(digits):
    model, reference = mlp(hidden=64), mlp(hidden=64)
    optimizer = _cmd(model, lr=0.05, momentum=0.0, weight_decay=1e-2, reduction=LowRank(rank=6, refresh_every=7))
    train(model, optimizer, digits, 45)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.05, weight_decay=1e-2), digits, 45)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_switch_report_and_the_public_view_list_every_matrix(digits):
    model = mlp(hidden=64)
    optimizer = _cmd(model, base=torch.optim.AdamW)
    train(model, optimizer, digits, 30)
    report = optimizer.switch_report
    assert [m["name"] for m in report["matrices"]] == ["0.weight", "2.weight", "4.weight"]
    assert [m["rank"] for m in report["matrices"]] == optimizer.reduced_phase.ranks
    assert report["matrices"][2]["rank"] == 0  # the 10-row head trains in full
    assert report["state_bytes"] == optimizer.state_bytes
    full_adamw = 8 * sum(p.numel() for p in model.parameters())
    assert optimizer.state_bytes < 0.35 * full_adamw


def test_a_share_too_small_for_useful_ranks_is_warned_about(digits):
    model = mlp(hidden=64)
    optimizer = _cmd(model, reduction=LowRank(state_share=0.01))
    with pytest.warns(RuntimeWarning, match=r"gives 2 matrices a rank below 4 \(0.weight, 2.weight\)"):
        train(model, optimizer, digits, 30)


@pytest.mark.parametrize("case", ["small", "stateless"])
def test_a_reduction_that_projects_nothing_is_warned_about(digits, case):
    """Matrices all at most ``min_side`` on their shorter side, or plain SGD (no state to save): the reduced
    phase is full training, and the switch says so."""
    model = mlp(hidden=64)
    if case == "small":
        optimizer = _cmd(model, base=torch.optim.AdamW, lr=1e-3, reduction=LowRank(min_side=64))
    else:
        optimizer = _cmd(model, lr=0.05, momentum=0.0)
    with pytest.warns(RuntimeWarning, match=r"projects none of the 3 tracked matrices"):
        train(model, optimizer, digits, 30)
    assert optimizer.reduced_phase.ranks == [0, 0, 0]


class _Tagger(nn.Module):
    """A token classifier: a large vocabulary that a batch uses a few rows of, and a small dense table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vocabulary = nn.Embedding(2000, 32)
        self.kinds = nn.Embedding(4, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens):
        return self.head(self.vocabulary(tokens) + self.kinds(tokens % 4))


def _tagger_steps(model, optimizer, steps, start=0):
    for step in range(start, steps):
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 50, (32,), generator=generator) + 50 * (step % 3)  # 150 of 2000 rows in use
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), tokens % 3).backward()
        optimizer.step()


def test_a_sparsely_used_embedding_keeps_training_only_in_the_rows_it_uses():
    model = _Tagger()
    optimizer = CMDOptimizer(model, base=torch.optim.AdamW, lr=1e-2, weight_decay=0.0, switch_after=30)
    _tagger_steps(model, optimizer, 30)
    vocabulary = model.vocabulary.weight.detach().clone()
    _tagger_steps(model, optimizer, 40, start=30)
    moved = (model.vocabulary.weight.detach() != vocabulary).any(dim=1)
    assert bool(moved[:150].all()) and not bool(moved[150:].any())  # the rows in use train, the rest stay
    assert optimizer.reduced_phase.plans[0].projected  # (2000, 32): a basis of the 32-wide side


def test_lbfgs_is_refused_with_the_alternative_named():
    with pytest.raises(ValueError, match="reduction='lowrank' cannot run with LBFGS.*use reduction='modes'"):
        CMDOptimizer(mlp(hidden=8), base=torch.optim.LBFGS, reduction="lowrank", switch_after=5)


@pytest.mark.slow
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_on_mnist1d_it_keeps_learning_where_the_modes_stall(base):
    """The model at the switch, full training, the paper's mode reduction and the low-rank one, one seed."""
    pytest.importorskip("mnist1d")
    data = datasets.mnist1d(num_samples=3000, seed=42)
    kwargs = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=3e-3)

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(32 * 40, 10))

    @torch.no_grad()
    def test_loss(model):
        return float(nn.functional.cross_entropy(model(data[2]), data[3]))

    results = {}
    for name in ("switch", "full", "modes", "lowrank"):
        model = cnn()
        if name in ("switch", "full"):
            train(model, base(model.parameters(), **kwargs), data, 400 if name == "switch" else 800, batch=128)
        else:
            extra = dict(snapshot_every=20) if name == "modes" else {}
            optimizer = CMDOptimizer(model, base=base, reduction=name, switch_after=400, **kwargs, **extra)
            train(model, optimizer, data, 800, batch=128)
        results[name] = (accuracy(model, data), test_loss(model))
    gain = results["full"][0] - results["switch"][0]
    assert results["lowrank"][0] - results["switch"][0] > 0.8 * gain, results
    assert results["lowrank"][0] > results["modes"][0] + 0.01, results


def test_a_resumed_low_rank_state_continues_bit_identically(digits):
    def run(stop=None):
        model = mlp(hidden=64)
        optimizer = _cmd(model, base=torch.optim.AdamW, reduction=LowRank(refresh_every=4))
        train(model, optimizer, digits, stop or 50)
        if stop is not None:
            state = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
            model = mlp(hidden=64)
            model.load_state_dict(state["model"])
            optimizer = _cmd(model, base=torch.optim.AdamW, reduction=LowRank(refresh_every=4))
            optimizer.load_state_dict(state["optimizer"])
            train(model, optimizer, digits, 50, start=stop)
        return model

    reference = run()
    for stop in (20, 30, 37, 42):  # warm-up, the switch, mid-window, right after a refresh
        resumed = run(stop)
        assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), resumed.parameters())), stop
