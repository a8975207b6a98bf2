"""Two gloo processes on the CPU against one process on the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer, Gradual
from cmd_optim.integrations.ddp import register_cmd_hook
from cmd_optim.optim._dist_checks import check_rank_consistency

STEPS, WARMUP, GLOBAL_BATCH = 50, 30, 64


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, modes=4, switch_after=WARMUP, snapshot_every=5,
                             samples=200, keep_free=["4.*"], lr=0.05, momentum=0.9, reduction="modes")
    return model, optimizer


def batch(step, data):
    index = torch.randint(0, len(data[0]), (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(step))
    return data[0][index], data[1][index]


def join(rank, world, folder, hook, make):
    """This rank's process group, the digits, and ``make()``'s model in DDP (with the CMD hook if ``hook``):
    (data, model, optimizer, ddp, hook state or None)."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, optimizer = make()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.004)  # several buckets
    return datasets.digits(seed=0), model, optimizer, ddp, register_cmd_hook(ddp, optimizer) if hook else None


def worker(rank, world, folder, hook):
    data, model, optimizer, ddp, state = join(rank, world, folder, hook, model_and_optimizer)
    sent, buckets = [], []
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step, data)
        before = (state.bytes_sent, state.bucket_calls) if hook else (0, 0)
        loss = nn.functional.cross_entropy(ddp(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if hook:
            sent.append(state.bytes_sent - before[0])
            buckets.append(state.bucket_calls - before[1])
    torch.save({"params": [p.detach() for p in model.parameters()], "sent": sent, "buckets": buckets,
                "modes": optimizer.switch_report["modes"], "phase": optimizer.phase},
               os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def single_process(world=2, make=model_and_optimizer, steps=STEPS):
    """One process on the global batch: the weights and the optimizer. Its loss is written as the mean of the
    ranks' shares' losses (the same number as the global mean) so that the warm-up rounds exactly as under
    DDP: CMD assigns each parameter to a mode by an argmax, which rounding-level differences can flip for a
    borderline one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = datasets.digits(seed=0)
    model, optimizer = make()
    share = GLOBAL_BATCH // world
    for step in range(steps):
        x, y = batch(step, data)
        losses = [nn.functional.cross_entropy(model(x[r * share:(r + 1) * share]), y[r * share:(r + 1) * share])
                  for r in range(world)]
        (sum(losses) / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    return [p.detach() for p in model.parameters()], optimizer


@pytest.mark.parametrize("hook", [True, False])
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, hook):
    mp.spawn(worker, args=(2, str(tmp_path), hook), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["phase"] == "reduced"
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)  # identical on every rank
    for p, q in zip(ranks[0]["params"], single_process()[0]):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)
    if hook:
        model, _ = model_and_optimizer()
        total = sum(p.numel() for p in model.parameters())
        head = sum(p.numel() for p in model[4].parameters())
        sent, buckets = ranks[0]["sent"], ranks[0]["buckets"]
        assert all(b > 1 for b in buckets[1:]), buckets  # DDP rebuilds its buckets after the first step
        # warm-up: the whole gradient; reduced phase: the mode vector per bucket, plus the free head
        assert sent[:WARMUP] == [4 * total] * WARMUP
        expected = [4 * (b * ranks[0]["modes"] + head) for b in buckets[WARMUP:]]
        assert sent[WARMUP:] == expected
        assert sent[-1] < sent[0] / 5


GRADUAL_STEPS = 60  # switch at 30, a snapshot every 5 steps and a round at each: rounds after 35, 40, ..., 60


def gradual_model_and_optimizer(base=torch.optim.SGD, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    reduction = Gradual(modes=4, samples=200, snapshot_every=5, every=1, fraction=0.3)
    optimizer = CMDOptimizer(model, base=base, switch_after=WARMUP, keep_free=["4.*"], reduction=reduction,
                             **(kwargs or dict(lr=0.05, momentum=0.9)))
    return model, optimizer


def gradual_worker(rank, world, folder, hook):
    data, model, optimizer, ddp, state = join(rank, world, folder, hook, gradual_model_and_optimizer)
    sent, live, state_bytes = [], [], []
    share = GLOBAL_BATCH // world
    for step in range(GRADUAL_STEPS):
        x, y = batch(step, data)
        before = state.bytes_sent if hook else 0
        live.append(optimizer.trainable_dims)  # what this step's backward exchanges
        loss = nn.functional.cross_entropy(ddp(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sent.append(state.bytes_sent - before if hook else 0)
        state_bytes.append(optimizer.state_bytes)
    torch.save({"params": [p.detach() for p in model.parameters()], "sent": sent, "live": live,
                "state_bytes": state_bytes, "rounds": optimizer.embedding.rounds, "phase": optimizer.phase},
               os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


@pytest.mark.parametrize("hook", [True, False])
def test_embedded_cmd_on_two_ranks_sends_only_live_gradients_and_matches_one_process(tmp_path, hook):
    mp.spawn(gradual_worker, args=(2, str(tmp_path), hook), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["phase"] == "reduced" and ranks[0]["rounds"] == 6
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)  # identical on every rank
    single, optimizer = single_process(make=gradual_model_and_optimizer, steps=GRADUAL_STEPS)
    embedded = optimizer.embedding.num_embedded
    assert embedded > 0
    for p, q in zip(ranks[0]["params"], single):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    model, _ = gradual_model_and_optimizer()
    total = sum(p.numel() for p in model.parameters())
    live, state_bytes = ranks[0]["live"], ranks[0]["state_bytes"]
    # the optimizer's state falls with each round (the base's state and the fit of the embedded elements go)
    rounds = [state_bytes[s - 1] for s in range(35, GRADUAL_STEPS + 1, 5)]
    assert all(later < earlier for earlier, later in zip([state_bytes[WARMUP], *rounds], rounds)), rounds
    assert rounds[-1] < state_bytes[WARMUP] / 2.5  # an embedded element keeps 10 bytes: flag, line, mode
    if hook:
        sent = ranks[0]["sent"]
        # warm-up: the whole gradient; gradual phase: the live elements' gradients and the free head's
        assert sent[:WARMUP] == [4 * total] * WARMUP
        assert sent[WARMUP:] == [4 * n for n in live[WARMUP:]]
        after_rounds = [sent[s] for s in range(35, GRADUAL_STEPS, 5)]  # the first step after each round
        assert all(later < earlier for earlier, later in zip([sent[WARMUP], *after_rounds], after_rounds))
        assert sent[-1] < sent[0] / 4


def gradual_no_sync_worker(rank, world, folder):
    data, model, optimizer, ddp, _ = join(rank, world, folder, True, gradual_model_and_optimizer)
    for step in range(WARMUP + 12):
        x, y = batch(step, data)
        nn.functional.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
        optimizer.step()
        optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    with ddp.no_sync():
        nn.functional.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
    try:
        optimizer.step()
        outcome = "stepped"
    except RuntimeError as error:
        outcome = str(error)
    unchanged = all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    torch.save({"outcome": outcome, "unchanged": unchanged, "embedded": optimizer.embedding.num_embedded},
               os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def test_embedded_cmd_refuses_a_step_on_unsynchronised_gradients(tmp_path):
    mp.spawn(gradual_no_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "found no gradients exchanged by the DDP hook" in result["outcome"]
        assert result["unchanged"] and result["embedded"] > 0


def disagreeing_worker(rank, world, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different weights on each rank: no DDP to keep them equal
    trajectory = torch.randn(6, 500)
    from cmd_optim import decompose
    try:
        check_rank_consistency(decompose(trajectory, modes=3, samples=100))
        outcome = "passed"
    except RuntimeError as error:
        outcome = str(error)
    torch.save(outcome, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def test_ranks_that_disagree_are_told_so(tmp_path):
    mp.spawn(disagreeing_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outcome = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "CMD decompositions differ across ranks" in outcome and "DistributedDataParallel" in outcome


def test_sharded_setups_are_refused_at_construction():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    with pytest.raises(TypeError, match="base=ZeroRedundancyOptimizer .DeepSpeed's ZeRO neither.*fully_shard"):
        CMDOptimizer(nn.Linear(3, 2), base=ZeroRedundancyOptimizer, switch_after=20)


def _torchrun(script, *args):
    import subprocess
    import sys
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_trainer_on_two_processes_trains_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    script = os.path.join(os.path.dirname(__file__), "ddp_trainer_run.py")
    _torchrun(script, str(tmp_path / "whole"))
    _torchrun(script, str(tmp_path / "resumed"), str(tmp_path / "whole" / "checkpoint-25"))  # after the switch
    runs = {name: [torch.load(tmp_path / name / f"final-rank{r}.pt", weights_only=True) for r in range(2)]
            for name in ("whole", "resumed")}
    for name, ranks in runs.items():
        assert [r["phase"] for r in ranks] == ["reduced", "reduced"] and ranks[0]["steps"] == 40
        assert all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], ranks[1]["params"])), name
    # the hook sat on the Trainer's own DDP wrapper: the whole gradient in the warm-up, the mode vector after
    whole = runs["whole"][0]
    assert whole["sent"][:20] == [4 * whole["num_params"]] * 20
    assert whole["sent"][20:] == [4 * whole["modes"]] * 20
    assert all(torch.equal(p, q) for p, q in zip(runs["whole"][0]["params"], runs["resumed"][0]["params"]))


def test_sharding_other_than_fsdp2_rows_is_refused(tmp_path):
    """FSDP2's row shards are supported (tests/integrations/test_fsdp.py); a replicated or column-sharded
    DTensor, and a mix of sharded and unsharded tracked parameters, are refused with the reason."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        rows = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))  # what FSDP2 trains
        assert CMDOptimizer([rows], switch_after=20).sharding is not None
        for placement in (Replicate(), Shard(1)):
            other = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [placement]))
            with pytest.raises(TypeError, match="CMDOptimizer supports FSDP2's Shard\\(0\\)"):
                CMDOptimizer([other], switch_after=20)
        with pytest.raises(TypeError, match="some tracked parameters are FSDP2 shards and some are not"):
            CMDOptimizer([rows, nn.Parameter(torch.randn(3))], switch_after=20)
    finally:
        dist.destroy_process_group()


def test_a_step_without_a_synchronised_backward_is_an_error(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        data = datasets.digits(seed=0)
        model, optimizer = model_and_optimizer()
        ddp = nn.parallel.DistributedDataParallel(model)
        register_cmd_hook(ddp, optimizer)
        for step in range(WARMUP + 2):
            x, y = batch(step, data)
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert optimizer.phase == "reduced"
        before = [p.detach().clone() for p in model.parameters()]
        with ddp.no_sync():
            nn.functional.cross_entropy(ddp(x), y).backward()
        with pytest.raises(RuntimeError, match="no mode gradient from the DDP hook"):
            optimizer.step()
        assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    finally:
        dist.destroy_process_group()
