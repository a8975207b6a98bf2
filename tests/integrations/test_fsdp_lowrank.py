"""The default (low-rank) reduction under FSDP2: two gloo processes on the CPU against one process on the same
global batch, through the warm-up, the switch and several refreshes, and resuming from a sharded checkpoint.

The model has a left-projected matrix whose rows split unevenly (33 rows: 17 and 16), a right-projected one
(81 x 33: its core split by rows, 41 and 40), and a head trained in full (10 rows, below ``min_side``)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer, LowRank
from tests.integrations import test_fsdp as fsdp_test
from tests.integrations.test_fsdp import WORLD, join, train

STEPS, SWITCH, REFRESH = 45, 20, 5
SAVES = (10, 20, 32)  # in the warm-up, at the switch, mid-window after two refreshes
#: base, its settings, and the fully_shard pattern each run uses
RUNS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), "per block"),
    "adamw": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.01), "one mesh"),
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 81), nn.ReLU(), nn.Linear(81, 10))


def optimizer(net, run):
    base, settings, _ = RUNS[run]
    return CMDOptimizer(net, base=base, switch_after=SWITCH, reduction=LowRank(refresh_every=REFRESH), **settings)


def sharded(pattern):
    return fsdp_test.sharded(pattern, build=model)


def _core_rows(opt):
    """This rank's rows of each core's first state tensor (a split core holds its rank's rows only)."""
    phase = opt.reduced_phase
    return [next(v for v in phase.optimizer.state[core].values() if v.ndim == 2) for core in phase.cores]


def sharded_runs(rank, world, folder):
    """Each run trained through the switch, saved at each of ``SAVES``, then resumed from each checkpoint in a
    freshly built model and optimizer."""


    join(rank, world, folder, "lowrank")
    data = datasets.digits(seed=0)
    out = {}
    for run, (_, _, pattern) in RUNS.items():
        net = sharded(pattern)
        opt = optimizer(net, run)
        for start, stop in zip((0, *SAVES), SAVES):
            train(net, opt, data, start, stop, rank)
            fsdp_test.save_checkpoint(net, opt, os.path.join(folder, run), stop)
        train(net, opt, data, SAVES[-1], STEPS, rank)
        states = _core_rows(opt)
        base, settings, _ = RUNS[run]
        default = CMDOptimizer(sharded(pattern), base=base, **settings).reduction  # none named: the default
        record = {"params": [p.full_tensor().detach() for p in net.parameters()], "report": opt.switch_report,
                  "default": type(default).__name__, "refreshes": opt.reduced_phase.refreshes,
                  "state_rows": [tuple(s.to_local().shape) if hasattr(s, "to_local") else tuple(s.shape)
                                 for s in states]}
        record["resumed"] = {}
        for stop in SAVES:
            resumed = sharded(pattern)
            resumed_opt = optimizer(resumed, run)
            fsdp_test.load_checkpoint(resumed, resumed_opt, os.path.join(folder, run), stop)
            assert resumed_opt.phase == ("warmup" if stop < SWITCH else "reduced")
            train(resumed, resumed_opt, data, stop, STEPS, rank)
            record["resumed"][stop] = [p.full_tensor().detach() for p in resumed.parameters()]
        out[run] = record
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def one_process(run):
    torch.set_num_threads(1)
    data = datasets.digits(seed=0)
    net = model()
    opt = optimizer(net, run)
    for step in range(STEPS):
        fsdp_test.one_process_step(net, opt, data, step)
    return [p.detach() for p in net.parameters()], opt.switch_report


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_lowrank")
    mp.spawn(sharded_runs, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("run", RUNS)
def test_the_default_reduction_runs_sharded_and_matches_one_process(ranks, run):
    sharded_run = ranks[0][run]
    params, report = one_process(run)
    assert sharded_run["default"] == "LowRank"  # under FSDP2 as on one process
    assert sharded_run["refreshes"] >= 4
    assert [m["rank"] for m in sharded_run["report"]["matrices"]] == [m["rank"] for m in report["matrices"]]
    assert [m["rank"] > 0 for m in report["matrices"]] == [True, True, False]
    for p, q in zip(sharded_run["params"], params):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)
    # the two ranks hold the same model
    for p, q in zip(sharded_run["params"], ranks[1][run]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("run", RUNS)
def test_each_rank_keeps_its_rows_of_a_split_core_and_the_whole_left_core(ranks, run):
    left = [ranks[r][run]["state_rows"][0] for r in range(WORLD)]
    right = [ranks[r][run]["state_rows"][1] for r in range(WORLD)]
    rank = ranks[0][run]["report"]["matrices"][0]["rank"]
    assert left == [(rank, 64)] * WORLD  # the left core (r x n) is whole on each rank
    assert [rows for rows, _ in right] == [41, 40]  # the right core (81 x r) split as the weight's rows


@pytest.mark.parametrize("stop", SAVES)
@pytest.mark.parametrize("run", RUNS)
def test_resume_from_a_sharded_checkpoint_ends_on_the_same_weights(ranks, run, stop):
    for r in range(WORLD):
        for p, q in zip(ranks[r][run]["params"], ranks[r][run]["resumed"][stop]):
            assert torch.equal(p, q)
