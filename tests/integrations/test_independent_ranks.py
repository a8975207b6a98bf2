"""CMDOptimizers in a gloo process group that nothing declared replicas of each other: each trains as one
process does, with no collective (before, the switch waited for every rank of the group and hung)."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer
from cmd_optim.integrations.ddp import register_cmd_hook
from tests._helpers import mlp, train
from tests.integrations.test_fsdp import WORLD, join

STEPS, SWITCH, TIMEOUT = 40, 20, 120
REDUCTIONS = ("lowrank", "modes", "gradual")


def make(reduction, model, **kwargs):
    """A CMDOptimizer over ``model`` with ``reduction`` that switches at step ``SWITCH``."""
    settings = {} if reduction == "lowrank" else dict(modes=4, samples=200, snapshot_every=5)
    return CMDOptimizer(model, base=torch.optim.SGD, switch_after=SWITCH, reduction=reduction, lr=0.05, momentum=0.9,
                        **settings, **kwargs)


def trained(reduction, hidden=32):
    """The weights and phase after ``STEPS`` steps of a digits MLP, as one process trains them."""
    model = mlp(hidden=hidden)
    optimizer = make(reduction, model)
    train(model, optimizer, datasets.digits(seed=0), STEPS)
    return {"params": [p.detach() for p in model.parameters()], "phase": optimizer.phase}


def spawn_or_fail(worker, folder):
    """``mp.spawn`` of ``WORLD`` ranks running ``worker(rank, WORLD, folder)``; the test fails, and the ranks are
    killed, if they have not all finished within ``TIMEOUT`` seconds."""
    context = mp.spawn(worker, args=(WORLD, str(folder)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # returns as each rank ends
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT} s (a collective waiting for a rank that never "
                        "joins it)")


def first_rank_alone(rank, world, folder):
    """Rank 0 trains an optimizer of each reduction through the switch; rank 1 only waits for its results."""
    join(rank, world, folder, "alone")
    result = os.path.join(folder, "alone.pt")
    if rank == 0:
        torch.save({reduction: trained(reduction) for reduction in REDUCTIONS}, result)
    else:
        while not os.path.exists(result):  # no collective: a rank 0 stuck in one waits for it in vain
            time.sleep(0.1)
    leave_process_group()


def test_an_optimizer_on_one_rank_only_trains_as_in_one_process(tmp_path):
    spawn_or_fail(first_rank_alone, tmp_path)
    results = torch.load(tmp_path / "alone.pt", weights_only=True)
    for reduction in REDUCTIONS:
        expected = trained(reduction)
        assert results[reduction]["phase"] == expected["phase"] == "reduced", reduction
        assert all(torch.equal(p, q) for p, q in zip(results[reduction]["params"], expected["params"])), reduction


def own_models(rank, world, folder):
    """Each rank trains a model of its own width (independent replicas, as in a seed sweep)."""
    join(rank, world, folder, "own")
    torch.save({reduction: trained(reduction, hidden=32 + 8 * rank) for reduction in ("lowrank", "modes")},
               os.path.join(folder, f"own{rank}.pt"))
    leave_process_group()


def test_ranks_with_models_of_their_own_each_train_as_in_one_process(tmp_path):
    """No rank tells the others it holds different parameters (before, the mode reduction raised that the
    decompositions differ across ranks)."""
    spawn_or_fail(own_models, tmp_path)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"own{rank}.pt", weights_only=True)
        for reduction, result in results.items():
            expected = trained(reduction, hidden=32 + 8 * rank)
            assert result["phase"] == "reduced"
            assert all(torch.equal(p, q) for p, q in zip(result["params"], expected["params"])), (rank, reduction)


def declared_replicas(rank, world, folder):
    """Rank r runs r + 1 threads. The low-rank phase's agreement (threads, agree) with the DDP module given to the
    optimizer; with the inner module given, before and after a CMD hook registered past the switch; and the
    mode reduction's switch on different weights with ``process_group=`` the default group."""
    def agreement(optimizer):
        threads, agree = optimizer.reduced_phase.agreement()
        return threads, agree is not None

    join(rank, world, folder, "declared")
    torch.set_num_threads(rank + 1)
    data = datasets.digits(seed=0)
    out = {}
    ddp = nn.parallel.DistributedDataParallel(mlp(hidden=32))
    optimizer = make("lowrank", ddp)
    train(ddp, optimizer, data, STEPS)
    out["given"] = agreement(optimizer)
    out["given_params"] = [p.detach() for p in ddp.parameters()]
    model = mlp(hidden=32)
    optimizer = make("lowrank", model)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, optimizer, data, STEPS)
    out["inner"] = agreement(optimizer)
    register_cmd_hook(ddp, optimizer)
    out["hooked"] = agreement(optimizer)
    model = mlp(seed=rank, hidden=32)  # other weights on each rank, declared replicas all the same
    try:
        train(model, make("modes", model, process_group=dist.group.WORLD), data, STEPS)
        out["different"] = "switched"
    except RuntimeError as error:
        out["different"] = str(error)
    torch.save(out, os.path.join(folder, f"declared{rank}.pt"))
    leave_process_group()


def test_ranks_declared_replicas_agree(tmp_path):
    spawn_or_fail(declared_replicas, tmp_path)
    ranks = [torch.load(tmp_path / f"declared{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for result in ranks:
        assert result["given"] == result["hooked"] == (1, True)  # the fewest threads, the first rank's bases
        assert result["inner"] == (None, False)  # DDP around the module the optimizer got: nothing declared
        assert "CMD decompositions differ across ranks" in result["different"]
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["given_params"], ranks[1]["given_params"]))
