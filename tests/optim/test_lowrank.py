"""The low-rank reduction: what it moves, how it refreshes, and that it keeps learning after the switch."""

import pytest
import torch
from torch import nn

from benchmarks import datasets
from cmd_optim import CMDOptimizer, LowRank
from cmd_optim.optim.lowrank import allocate_ranks
from tests._helpers import accuracy, mlp, train


def test_ranks_share_the_budget_by_size_and_stop_at_full_rank():
    shapes = [(256, 64), (256, 256), (10, 256), (3, 3)]
    ranks = allocate_ranks(shapes, 4000)
    assert sum(r * r for r in ranks) <= 4000 and ranks[2] == 10  # (10, 256) is full at rank 10
    assert ranks[1] > ranks[0] > ranks[3] >= 1  # the rest by size
    assert allocate_ranks(shapes, 0) == [1, 1, 1, 1]  # every matrix keeps a direction
    assert allocate_ranks([(5, 7)], 10**6) == [5]
    capped = allocate_ranks([(512, 512), (64, 64)], 10**5, max_rank=32)
    assert capped == [32, 32]  # the cap leaves the rest of the budget unused


def _cmd(model, base=torch.optim.SGD, **kwargs):
    settings = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    settings.update(kwargs)
    return CMDOptimizer(model, base=base, switch_after=30, snapshot_every=10, **settings)


def test_within_a_window_each_matrix_moves_in_its_rank_r_subspace(digits):
    model = mlp(hidden=32)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=50))
    train(model, optimizer, digits, 30)
    assert optimizer.snapshot_bytes == 0 and optimizer.phase == "reduced"  # it needs no snapshots
    at_switch = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, digits, 45, start=30)
    phase = optimizer._phase
    for p, before, (u, v), rank in zip(phase.matrices, [at_switch[0], at_switch[2], at_switch[4]], phase.directions,
                                       phase.ranks):
        change = (p.detach() - before).reshape(u.shape[0], v.shape[0])
        torch.testing.assert_close(u @ (u.T @ change @ v) @ v.T, change, atol=1e-5, rtol=1e-4)  # inside U . V^T
        assert torch.linalg.matrix_rank(change) <= rank
    biases = [at_switch[1], at_switch[3], at_switch[5]]
    assert all(not torch.equal(b, p) for b, p in zip(biases, [model[0].bias, model[2].bias, model[4].bias]))
    total = sum(p.numel() for p in model.parameters())
    assert optimizer.trainable_dims <= 0.05 * total  # a model under 100K parameters: 5%


def test_a_refresh_takes_the_top_directions_of_the_decayed_gradient_sum_and_rotates_the_state(digits):
    model = mlp(hidden=32)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=5, memory=0.5))
    train(model, optimizer, digits, 34)  # 4 reduced steps: the window is not over
    phase = optimizer._phase
    core = phase.cores[1]
    momentum = optimizer.inner_optimizer.state[core]["momentum_buffer"].clone()
    old_u, old_v = phase.directions[1]
    sums = phase.sums[1].float().clone()
    train(model, optimizer, digits, 35, start=34)  # the fifth: refresh
    grad = model[2].weight.grad.reshape(sums.shape)
    expected = torch.linalg.svd((sums + grad.to(torch.bfloat16).float()).double())
    new_u, new_v = phase.directions[1]
    rank = phase.ranks[1]
    torch.testing.assert_close((new_u.T.double() @ expected.U[:, :rank]).abs().sum(0), torch.ones(rank).double(),
                               atol=0.05, rtol=0)  # the same subspace, up to signs and near-ties
    assert phase.window_steps == 0 and not core.detach().any()
    assert torch.allclose(phase.sums[1].float(), (sums + grad.to(torch.bfloat16).float()).to(torch.bfloat16).float()
                          * 0.5, rtol=1e-2, atol=1e-3)
    stepped = optimizer.inner_optimizer.state[core]["momentum_buffer"]
    assert not torch.equal(stepped, momentum)  # re-expressed in the new basis (and one step further)


def test_the_step_ratio_matches_the_first_order_decrease(digits):
    model = mlp(hidden=32)
    optimizer = _cmd(model, reduction=LowRank(refresh_every=4, max_step_ratio=10.0))
    train(model, optimizer, digits, 35)  # a refresh after step 34 measured the ratios; step 35 used them
    phase = optimizer._phase
    assert all(1.0 <= r <= 10.0 for r in phase.ratios)
    full, core = phase.statistics[0]
    assert full >= core > 0  # a projection never holds more of the gradient than the gradient
    assert optimizer.inner_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * phase.ratios[0])


def test_sgd_cores_step_as_far_as_the_full_step_adam_cores_decrease_the_loss_as_much(digits):
    ratios = {}
    for base in (torch.optim.SGD, torch.optim.AdamW):
        model = mlp(hidden=32)
        optimizer = _cmd(model, base=base, reduction=LowRank(refresh_every=4, max_step_ratio=1000.0))
        train(model, optimizer, digits, 34)
        full, core = optimizer._phase.statistics[0]
        ratios[base] = (optimizer._phase.ratios[0], full / core)  # statistics decayed as one: their ratio holds
    assert ratios[torch.optim.SGD][0] == pytest.approx(ratios[torch.optim.SGD][1] ** 0.5, rel=1e-6)
    assert ratios[torch.optim.AdamW][0] == pytest.approx(ratios[torch.optim.AdamW][1], rel=1e-6)


def test_refreshes_draw_from_their_own_generator_and_replicas_agree(digits):
    """The range finder's random matrix is seeded by the refresh and the shape: two runs from the same
    start get the same directions whatever the global RNG does, and the global RNG is not consumed."""
    results = []
    for noise in (0, 1):
        model = mlp(hidden=64)
        optimizer = _cmd(model, reduction=LowRank(refresh_every=3, budget=0.01))
        train(model, optimizer, digits, 30)
        torch.manual_seed(noise)  # the user's RNG differs between the runs
        state = torch.random.get_rng_state()
        train(model, optimizer, digits, 40, start=30)  # three refreshes
        assert torch.equal(torch.random.get_rng_state(), state)
        assert optimizer._phase.ranks[0] * 4 < 64  # the randomised path, not the exact SVD
        results.append([u.clone() for u, _ in optimizer._phase.directions])
    assert all(torch.equal(a, b) for a, b in zip(*results))


class _Tagger(nn.Module):
    """A token classifier: a large vocabulary that a batch uses a few rows of, and a small dense table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vocabulary = nn.Embedding(2000, 16)
        self.kinds = nn.Embedding(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(self.vocabulary(tokens) + self.kinds(tokens % 4))


def _tagger_steps(model, optimizer, steps, start=0):
    for step in range(start, steps):
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 50, (32,), generator=generator) + 50 * (step % 3)  # 150 of 2000 rows in use
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), tokens % 3).backward()
        optimizer.step()


@pytest.mark.parametrize("given", ["module", "named groups"])
def test_an_embedding_that_the_warm_up_used_sparsely_is_frozen_and_a_dense_one_trains(given):
    model = _Tagger()
    source = model if given == "module" else [{"params": list(model.named_parameters())}]  # as the Trainer passes
    optimizer = CMDOptimizer(source, base=torch.optim.AdamW, lr=1e-2, switch_after=30, reduction="lowrank")
    _tagger_steps(model, optimizer, 30)
    vocabulary, kinds = model.vocabulary.weight.detach().clone(), model.kinds.weight.detach().clone()
    _tagger_steps(model, optimizer, 40, start=30)
    phase = optimizer._phase
    assert [p is model.vocabulary.weight for p in phase.matrices] == [False, False]  # kinds and head train
    assert phase.frozen == [0] and torch.equal(model.vocabulary.weight, vocabulary)
    assert not torch.equal(model.kinds.weight, kinds)
    assert optimizer.trainable_dims == sum(r * r for r in phase.ranks) + 3  # + the head's bias
    never = CMDOptimizer(_Tagger(), base=torch.optim.AdamW, lr=1e-2, switch_after=30,
                         reduction=LowRank(freeze_sparse_below=0))
    assert never._setup.watched_matrices == []


def test_a_resume_inside_the_marking_window_freezes_the_same_embeddings():
    def run(resume_at=None):
        model = _Tagger()
        optimizer = CMDOptimizer(model, base=torch.optim.AdamW, lr=1e-2, switch_after=30, reduction="lowrank")
        _tagger_steps(model, optimizer, resume_at or 40)
        if resume_at is not None:
            state = optimizer.state_dict()
            assert "touched_rows" in state["cmd"]
            resumed = CMDOptimizer(model, base=torch.optim.AdamW, lr=1e-2, switch_after=30, reduction="lowrank")
            resumed.load_state_dict(state)
            optimizer = resumed
            _tagger_steps(model, optimizer, 40, start=resume_at)
        return model, optimizer

    reference, expected = run()
    resumed_model, resumed = run(resume_at=25)
    assert resumed._phase.frozen == expected._phase.frozen == [0]
    for a, b in zip(reference.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_lbfgs_is_refused_with_the_alternative_named():
    with pytest.raises(ValueError, match="LBFGS takes a single group: use reduction='modes'"):
        CMDOptimizer(mlp(hidden=8), base=torch.optim.LBFGS, reduction="lowrank", switch_after=5)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_on_mnist1d_it_keeps_learning_where_the_modes_stall(base):
    """The model at the switch, full training, the paper's mode reduction and the low-rank one, one seed."""
    pytest.importorskip("mnist1d")
    data = datasets.mnist1d(num_samples=3000, seed=42)
    kwargs = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=3e-3)

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 40, 10))

    @torch.no_grad()
    def test_loss(model):
        return float(nn.functional.cross_entropy(model(data[2]), data[3]))

    results = {}
    for name in ("switch", "full", "modes", "lowrank"):
        model = cnn()
        if name in ("switch", "full"):
            train(model, base(model.parameters(), **kwargs), data, 400 if name == "switch" else 800, batch=128)
        else:
            optimizer = CMDOptimizer(model, base=base, reduction=name, switch_after=400, snapshot_every=20, **kwargs)
            train(model, optimizer, data, 800, batch=128)
            assert optimizer.trainable_dims <= 0.05 * sum(p.numel() for p in model.parameters())
        results[name] = (accuracy(model, data), test_loss(model))
    gain = results["full"][0] - results["switch"][0]
    assert results["lowrank"][0] - results["switch"][0] > 0.6 * gain, results
    assert results["lowrank"][0] > results["modes"][0] + 0.01, results
