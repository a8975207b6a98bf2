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


def join(rank, world, folder, run):
    # a file store of its own per run: one left by an earlier group cannot be joined again
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{run}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def sharded(pattern="one mesh", build=None):
    """The model (``build()``, default :func:`model`) under fully_shard on each Linear and then on the root:
    with one mesh passed to every call, or ("per block") without a mesh, as torch's FSDP2 docs write it (each
    call makes a DeviceMesh object of its own, over the same ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if pattern == "one mesh" else None
    net = (build or model)()
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


def save_checkpoint(net, opt, prefix, stop):
    """The sharded model (DCP) and optimizer (``cmd_optim.integrations.fsdp``) at ``{prefix}-model-{stop}`` and
    ``{prefix}-optimizer-{stop}``."""
    import torch.distributed.checkpoint as dcp

    from cmd_optim.integrations import fsdp

    dcp.save(net.state_dict(), checkpoint_id=f"{prefix}-model-{stop}")
    fsdp.save(opt, f"{prefix}-optimizer-{stop}")


def load_checkpoint(net, opt, prefix, stop):
    """What :func:`save_checkpoint` wrote, into a freshly built model and optimizer."""
    import torch.distributed.checkpoint as dcp

    from cmd_optim.integrations import fsdp

    state = net.state_dict()
    dcp.load(state, checkpoint_id=f"{prefix}-model-{stop}")
    net.load_state_dict(state)
    fsdp.load(opt, f"{prefix}-optimizer-{stop}")


def one_process_step(net, opt, data, step):
    """One step in one process on the ranks' shares: the loss their mean, as FSDP averages the gradient (the
    rounding then matches)."""
    losses = [nn.functional.cross_entropy(net(x), y) for x, y in shares(step, data)]
    (sum(losses) / WORLD).backward()
    opt.step()
    opt.zero_grad()


# and the files' names. "per block" first: torch may hand a later DTensor an earlier, equal mesh object
PATTERNS = {"per block": "per-block", "one mesh": "one-mesh"}


def whole_run(rank, world, folder):
    """Train under each pattern, saving sharded checkpoints in the warm-up (step 20) and in the reduced phase
    (step 40); then the meshes CMDOptimizer refuses."""


    join(rank, world, folder, "whole")
    data = datasets.digits(seed=0)
    for pattern, name in PATTERNS.items():
        net = sharded(pattern)
        mesh_objects = len({id(p.device_mesh) for p in net.parameters()})
        opt = optimizer(net)
        for start, stop in ((0, 20), (20, 40), (40, STEPS)):
            train(net, opt, data, start, stop, rank)
            if stop in (20, 40):
                save_checkpoint(net, opt, os.path.join(folder, name), stop)
        full = [p.full_tensor().detach() for p in net.parameters()]
        if rank == 0:
            torch.save({"params": full, "report": opt.switch_report, "phase": opt.phase,
                        "state_bytes": opt.state_bytes,
                        "mesh_objects": mesh_objects},
                       os.path.join(folder, f"{name}.pt"))
    refusals = refused_meshes(world)
    if rank == 0:
        torch.save(refusals, os.path.join(folder, "refused.pt"))
    leave_process_group()


def refused_meshes(world):
    """CMDOptimizer's answer to a 2-D mesh (HSDP: fully_shard(mesh=2-D mesh), here of shape (1, world)) and
    to parameters on meshes over different rank lists (one layer's mesh lists the ranks backwards)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = model()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    mixed = model()
    fully_shard(mixed[0], mesh=DeviceMesh("cpu", torch.arange(world).flip(0)))
    fully_shard(mixed)
    outcomes = {}
    for name, net in (("2-D mesh", hsdp), ("different ranks", mixed)):
        try:
            CMDOptimizer(net, base=torch.optim.SGD, switch_after=SWITCH, lr=0.05)  # the default reduction
            outcomes[name] = "accepted"
        except (TypeError, ValueError) as error:
            outcomes[name] = str(error)
    return outcomes


RESUMED = [("per block", 40), ("one mesh", 20), ("one mesh", 40)]


def resumed_runs(rank, world, folder):
    """Each checkpoint into a freshly built model and optimizer (in its warm-up), trained to the end; new
    processes, one process group for all of them."""


    join(rank, world, folder, "resumed")
    for pattern, stop in RESUMED:
        name = PATTERNS[pattern]
        net = sharded(pattern)
        opt = optimizer(net)
        load_checkpoint(net, opt, os.path.join(folder, name), stop)
        assert opt.steps_taken == stop and opt.phase == ("warmup" if stop < SWITCH else "reduced")
        train(net, opt, datasets.digits(seed=0), stop, STEPS, rank)
        full = [p.full_tensor().detach() for p in net.parameters()]
        if rank == 0:
            torch.save({"params": full}, os.path.join(folder, f"{name}-resumed-{stop}.pt"))
    leave_process_group()


def one_process():
    """The same training in one process; its loss is the mean of the ranks' shares' losses, as FSDP forms
    the averaged gradient (the rounding then matches)."""
    torch.set_num_threads(1)
    data = datasets.digits(seed=0)
    net = model()
    opt = optimizer(net)
    for step in range(STEPS):
        one_process_step(net, opt, data, step)
    return [p.detach() for p in net.parameters()], opt.switch_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(whole_run, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    mp.spawn(resumed_runs, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return folder


@pytest.fixture(scope="module")
def reference():
    return one_process()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_two_sharded_ranks_match_one_process_through_the_switch(runs, reference, pattern):
    whole = torch.load(runs / f"{PATTERNS[pattern]}.pt", weights_only=True)
    params, report = reference
    assert whole["phase"] == "reduced"
    if pattern == "per block":  # the case at stake: DeviceMesh objects of their own, over the same ranks
        assert whole["mesh_objects"] > 1
    # the same samples, references and fit: the same modes; the quality's sums added over the ranks
    floats = ("relative_error", "explained_variance")
    assert {k: v for k, v in whole["report"].items() if k not in floats} == \
        {k: v for k, v in report.items() if k not in floats}
    assert [whole["report"][k] for k in floats] == pytest.approx([report[k] for k in floats], rel=1e-5)
    for p, q in zip(whole["params"], params):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("pattern", "stop"), RESUMED)  # in the warm-up, and in the reduced phase
def test_resume_from_a_sharded_checkpoint_ends_on_the_same_weights(runs, pattern, stop):
    whole = torch.load(runs / f"{PATTERNS[pattern]}.pt", weights_only=True)
    resumed = torch.load(runs / f"{PATTERNS[pattern]}-resumed-{stop}.pt", weights_only=True)
    for p, q in zip(whole["params"], resumed["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", ["2-D mesh", "different ranks"])
def test_meshes_it_cannot_serve_are_refused_with_the_alternative(runs, case):
    outcome = torch.load(runs / "refused.pt", weights_only=True)[case]
    assert ("2-D device mesh" if case == "2-D mesh" else "different device meshes") in outcome
    assert f"fully_shard(module, mesh=init_device_mesh('cpu', ({WORLD},)))" in outcome
    assert "DistributedDataParallel" in outcome


def _refused(rank, world, folder):
    join(rank, world, folder, "keep")
    try:
        optimizer(sharded(), keep_decomposition=True)
        outcome = "accepted"
    except (TypeError, ValueError) as error:
        outcome = str(error)
    torch.save(outcome, os.path.join(folder, "outcome.pt"))
    leave_process_group()


def test_keep_decomposition_is_refused_under_fsdp2_with_the_alternative(tmp_path):
    """Every reduction runs sharded (tests/integrations/test_fsdp_lowrank.py, test_fsdp_gradual.py); keeping the
    whole decomposition does not (each rank fits its own shard's columns)."""
    mp.spawn(_refused, args=(1, str(tmp_path)), nprocs=1, join=True)
    outcome = torch.load(tmp_path / "outcome.pt", weights_only=True)
    assert "keep_decomposition" in outcome and "FSDP2-sharded" in outcome and "DistributedDataParallel" in outcome


def test_a_warmup_checkpoint_resumes_on_meshes_of_different_dimension_names(tmp_path):
    """One block on a mesh named ("dp",), the rest on the root's unnamed one (the same ranks: accepted as one
    mesh): the loaded momentum buffers sit on meshes of their parameters' names, so the resumed step runs
    (DTensor refuses arithmetic across meshes of different names). One process, in this one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from cmd_optim.integrations import fsdp

    def build():
        net = model()
        fully_shard(net[0], mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)))
        fully_shard(net)
        return net, optimizer(net, foreach=False)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        data = datasets.digits(seed=0)
        net, opt = build()
        train(net, opt, data, 0, 5, 0)
        fsdp.save(opt, tmp_path / "optimizer")
        resumed, resumed_opt = build()
        resumed.load_state_dict(net.state_dict())
        fsdp.load(resumed_opt, tmp_path / "optimizer")
        train(net, opt, data, 5, 7, 0)
        train(resumed, resumed_opt, data, 5, 7, 0)
        for p, q in zip(net.parameters(), resumed.parameters()):
            assert torch.equal(p.full_tensor(), q.full_tensor())
    finally:
        dist.destroy_process_group()
