"""FSDP2 (fully_shard): two gloo processes on the CPU against one process on the same global batch, and
resuming from a sharded torch.distributed.checkpoint."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer

STEPS, SWITCH, GLOBAL_BATCH, WORLD = 50, 30, 64, 2


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def optimizer(net, **kwargs):
    return CMDOptimizer(net, base=torch.optim.SGD, modes=4, switch_after=SWITCH, snapshot_every=5, samples=200,
                        lr=0.05, momentum=0.9, **{"reduction": "modes", **kwargs})


def shares(step, data, world=WORLD):
    index = torch.randint(0, len(data[0]), (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(step))
    share = GLOBAL_BATCH // world
    return [(data[0][index[r * share:(r + 1) * share]], data[1][index[r * share:(r + 1) * share]])
            for r in range(world)]


def sharded(rank, world, folder, run):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a file store of its own per run: one left by an earlier group cannot be joined again
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{run}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def train(net, opt, data, start, stop, rank):
    for step in range(start, stop):
        x, y = shares(step, data)[rank]
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def whole_run(rank, world, folder):
    """Train, saving sharded checkpoints in the warm-up (step 20) and in the reduced phase (step 40)."""
    import torch.distributed.checkpoint as dcp

    from cmd_optim.integrations import fsdp

    net = sharded(rank, world, folder, "whole")
    opt = optimizer(net)
    data = datasets.digits(seed=0)
    for start, stop in ((0, 20), (20, 40), (40, STEPS)):
        train(net, opt, data, start, stop, rank)
        if stop in (20, 40):
            dcp.save(net.state_dict(), checkpoint_id=os.path.join(folder, f"model-{stop}"))
            fsdp.save(opt, os.path.join(folder, f"optimizer-{stop}"))
    full = [p.full_tensor().detach() for p in net.parameters()]
    if rank == 0:
        torch.save({"params": full, "report": opt.switch_report, "phase": opt.phase,
                    "state_bytes": opt.state_bytes}, os.path.join(folder, "whole.pt"))
    leave_process_group()


def resumed_run(rank, world, folder, stop):
    import torch.distributed.checkpoint as dcp

    from cmd_optim.integrations import fsdp

    net = sharded(rank, world, folder, f"resumed-{stop}")
    opt = optimizer(net)  # a fresh optimizer, in its warm-up
    state = net.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(folder, f"model-{stop}"))
    net.load_state_dict(state)
    fsdp.load(opt, os.path.join(folder, f"optimizer-{stop}"))
    assert opt.steps_taken == stop
    train(net, opt, datasets.digits(seed=0), stop, STEPS, rank)
    full = [p.full_tensor().detach() for p in net.parameters()]
    if rank == 0:
        torch.save({"params": full}, os.path.join(folder, f"resumed-{stop}.pt"))
    leave_process_group()


def one_process():
    """The same training in one process; its loss is the mean of the ranks' shares' losses, as FSDP forms
    the averaged gradient (the rounding then matches)."""
    torch.set_num_threads(1)
    data = datasets.digits(seed=0)
    net = model()
    opt = optimizer(net)
    for step in range(STEPS):
        losses = [nn.functional.cross_entropy(net(x), y) for x, y in shares(step, data)]
        (sum(losses) / WORLD).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in net.parameters()], opt.switch_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(whole_run, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    for stop in (20, 40):
        mp.spawn(resumed_run, args=(WORLD, str(folder), stop), nprocs=WORLD, join=True)
    return folder


def test_two_sharded_ranks_match_one_process_through_the_switch(runs):
    whole = torch.load(runs / "whole.pt", weights_only=True)
    params, report = one_process()
    assert whole["phase"] == "reduced"
    assert whole["report"] == report  # the same samples, references and fit: the same modes and quality
    for p, q in zip(whole["params"], params):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stop", [20, 40])  # in the warm-up, and in the reduced phase
def test_resume_from_a_sharded_checkpoint_ends_on_the_same_weights(runs, stop):
    whole = torch.load(runs / "whole.pt", weights_only=True)
    resumed = torch.load(runs / f"resumed-{stop}.pt", weights_only=True)
    for p, q in zip(whole["params"], resumed["params"]):
        assert torch.equal(p, q)


def _refused(rank, world, folder, reduction):
    net = sharded(rank, world, folder, reduction)
    try:
        optimizer(net, reduction=reduction)
        outcome = "accepted"
    except (TypeError, ValueError) as error:
        outcome = str(error)
    torch.save(outcome, os.path.join(folder, "outcome.pt"))
    leave_process_group()


@pytest.mark.parametrize("reduction", ["gradual", "lowrank"])
def test_reductions_without_sharded_support_are_refused_with_the_alternative(tmp_path, reduction):
    mp.spawn(_refused, args=(1, str(tmp_path), reduction), nprocs=1, join=True)
    outcome = torch.load(tmp_path / "outcome.pt", weights_only=True)
    assert "FSDP2-sharded parameters" in outcome and "reduction='modes'" in outcome
