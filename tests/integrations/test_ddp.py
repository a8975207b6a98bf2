"""Two gloo processes on the CPU against one process on the same global batch."""
import copy
import functools
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer, Gradual, LowRank
from cmd_optim.core import SubspaceMap
from cmd_optim.integrations.ddp import power_step_reference, register_cmd_hook
from cmd_optim.optim._dist_checks import check_rank_consistency

STEPS, WARMUP, GLOBAL_BATCH = 50, 30, 64


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of this process alone, for the test's length."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, modes=4, switch_after=WARMUP, snapshot_every=5,
                             samples=200, keep_free=["4.*"], lr=0.05, momentum=0.9, reduction="modes")
    return model, optimizer


def batch(step, data):
    index = torch.randint(0, len(data[0]), (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(step))
    return data[0][index], data[1][index]


def join(rank, world, folder, hook, make, bucket_cap_mb=0.004):
    """This rank's process group, the digits, and ``make()``'s model in DDP (with the CMD hook if ``hook``):
    (data, model, optimizer, ddp, hook state or None). By default in several buckets."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, optimizer = make()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
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


def gradual_model_and_optimizer(base=torch.optim.SGD, embedded_gradient="dropped", **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    reduction = Gradual(modes=4, samples=200, snapshot_every=5, every=1, fraction=0.3,
                        embedded_gradient=embedded_gradient)
    optimizer = CMDOptimizer(model, base=base, switch_after=WARMUP, keep_free=["4.*"], reduction=reduction,
                             **(kwargs or dict(lr=0.05, momentum=0.9)))
    return model, optimizer


def gradual_worker(rank, world, folder, hook, embedded_gradient="dropped"):
    make = functools.partial(gradual_model_and_optimizer, embedded_gradient=embedded_gradient)
    data, model, optimizer, ddp, state = join(rank, world, folder, hook, make)
    sent, buckets, live, state_bytes = [], [], [], []
    share = GLOBAL_BATCH // world
    for step in range(GRADUAL_STEPS):
        x, y = batch(step, data)
        before = (state.bytes_sent, state.bucket_calls) if hook else (0, 0)
        live.append(optimizer.trainable_dims)  # what this step's backward exchanges
        loss = nn.functional.cross_entropy(ddp(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sent.append(state.bytes_sent - before[0] if hook else 0)
        buckets.append(state.bucket_calls - before[1] if hook else 0)
        state_bytes.append(optimizer.state_bytes)
    torch.save({"params": [p.detach() for p in model.parameters()], "sent": sent, "buckets": buckets, "live": live,
                "state_bytes": state_bytes, "rounds": optimizer.embedding.rounds, "phase": optimizer.phase,
                "modes": optimizer.switch_report["modes"]}, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


@pytest.mark.parametrize("embedded_gradient", ["dropped", "pooled"])
@pytest.mark.parametrize("hook", [True, False])
def test_embedded_cmd_on_two_ranks_sends_only_live_gradients_and_matches_one_process(tmp_path, hook,
                                                                                     embedded_gradient):
    mp.spawn(gradual_worker, args=(2, str(tmp_path), hook, embedded_gradient), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["phase"] == "reduced" and ranks[0]["rounds"] == 6
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)  # identical on every rank
    make = functools.partial(gradual_model_and_optimizer, embedded_gradient=embedded_gradient)
    single, optimizer = single_process(make=make, steps=GRADUAL_STEPS)
    embedded = optimizer.embedding.num_embedded
    assert embedded > 0
    for p, q in zip(ranks[0]["params"], single):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    if embedded_gradient == "pooled":  # the pooled gradients moved the references: other weights than dropping
        dropped, _ = single_process(make=gradual_model_and_optimizer, steps=GRADUAL_STEPS)
        assert max(float((p - q).abs().max()) for p, q in zip(single, dropped)) > 1e-3
    model, _ = gradual_model_and_optimizer()
    total = sum(p.numel() for p in model.parameters())
    live, state_bytes = ranks[0]["live"], ranks[0]["state_bytes"]
    # the optimizer's state falls with each round (the base's state and the fit of the embedded elements go)
    rounds = [state_bytes[s - 1] for s in range(35, GRADUAL_STEPS + 1, 5)]
    assert all(later < earlier for earlier, later in zip([state_bytes[WARMUP], *rounds], rounds)), rounds
    assert rounds[-1] < state_bytes[WARMUP] / 2.5  # an embedded element keeps 10 bytes: flag, line, mode
    if hook:
        sent, buckets = ranks[0]["sent"], ranks[0]["buckets"]
        # warm-up: the whole gradient; gradual phase: the live elements' gradients and the free head's, and
        # when pooled each bucket's sums over its embedded elements, one per mode
        sums = ranks[0]["modes"] if embedded_gradient == "pooled" else 0
        assert all(b > 1 for b in buckets[1:]), buckets
        assert sent[:WARMUP] == [4 * total] * WARMUP
        assert sent[WARMUP:] == [4 * (n + sums * b) for n, b in zip(live[WARMUP:], buckets[WARMUP:])]
        after_rounds = [sent[s] for s in range(35, GRADUAL_STEPS, 5)]  # the first step after each round
        assert all(later < earlier for earlier, later in zip([sent[WARMUP], *after_rounds], after_rounds))
        assert sent[-1] - 4 * sums * buckets[-1] < sent[0] / 4  # (the test's buckets are tiny: M sums each)


def step_after_no_sync(rank, world, data, model, optimizer, ddp, steps) -> dict:
    """``steps`` synchronised steps, then a backward inside ``ddp.no_sync()`` and a step: what the step did
    ("stepped" or its error) and whether the weights stayed as they were."""
    for step in range(steps):
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
    return {"outcome": outcome, "unchanged": all(torch.equal(p, q) for p, q in zip(before, model.parameters()))}


def gradual_no_sync_worker(rank, world, folder):
    data, model, optimizer, ddp, _ = join(rank, world, folder, True, gradual_model_and_optimizer)
    record = step_after_no_sync(rank, world, data, model, optimizer, ddp, WARMUP + 12)
    torch.save({**record, "embedded": optimizer.embedding.num_embedded}, os.path.join(folder, f"rank{rank}.pt"))
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


def test_trainer_with_the_default_reduction_compresses_under_the_hook(tmp_path):
    """CMDCallback.install registers the hook on the Trainer's own DDP wrapper: after the switch it sends the
    low-rank hook's numbers, through refreshes, and the ranks stay identical (under the Trainer's clipping); the
    hook's state travels with the checkpoints, and a resumed run ends on the same weights."""
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    _torchrun(os.path.join(os.path.dirname(__file__), "ddp_trainer_run.py"), str(tmp_path), "lowrank")
    ranks = [torch.load(tmp_path / f"final-rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["phase"] for r in ranks] == ["reduced", "reduced"] and ranks[0]["refreshes"] == 4
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], ranks[1]["params"]))
    sent = ranks[0]["sent"]
    assert sent[:20] == [4 * ranks[0]["num_params"]] * 20
    assert sent[20:] == [4 * ranks[0]["numbers"]] * 20 and sent[-1] < sent[0] / 10
    # resumed after the switch and a refresh, the hook's error feedback from the checkpoint: the same weights
    assert all((tmp_path / "checkpoint-25" / f"cmd_hook_rank{r}.pt").exists() for r in range(2))
    _torchrun(os.path.join(os.path.dirname(__file__), "ddp_trainer_run.py"), str(tmp_path / "resumed"), "lowrank",
              str(tmp_path / "checkpoint-25"))
    resumed = torch.load(tmp_path / "resumed" / "final-rank0.pt", weights_only=True)
    assert resumed["steps"] == 40 and all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], resumed["params"]))


def test_sharding_other_than_fsdp2_rows_is_refused(one_rank):
    """FSDP2's row shards are supported (tests/integrations/test_fsdp.py); a replicated or column-sharded
    DTensor, a mix of sharded and unsharded tracked parameters, and shards given a replicas' process_group, are
    refused with the reason."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    rows = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))  # what FSDP2 trains
    assert CMDOptimizer([rows], switch_after=20).sharding is not None
    for placement in (Replicate(), Shard(1)):
        other = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [placement]))
        with pytest.raises(TypeError, match="CMDOptimizer supports FSDP2's Shard\\(0\\)"):
            CMDOptimizer([other], switch_after=20)
    with pytest.raises(TypeError, match="some tracked parameters are FSDP2 shards and some are not"):
        CMDOptimizer([rows, nn.Parameter(torch.randn(3))], switch_after=20)
    with pytest.raises(TypeError, match="process_group declares ranks that hold replicas; FSDP2 shards"):
        CMDOptimizer([rows], switch_after=20, process_group=dist.group.WORLD)


def test_a_step_without_a_synchronised_backward_is_an_error(one_rank):
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


# ---------------------------------------------------------------------------------------------- low-rank hook
LOW_WARMUP, REFRESH_EVERY = 10, 10
LOW_STEPS = LOW_WARMUP + 3 * REFRESH_EVERY + 1  # refreshes at reduced steps 10, 20 and 30


def lowrank_model_and_optimizer():
    """A 64-32-32-10 MLP: two projected matrices (ranks 5 and 4), a head trained in full, biases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, switch_after=LOW_WARMUP,
                             reduction=LowRank(refresh_every=REFRESH_EVERY), lr=0.05, momentum=0.9)
    return model, optimizer


def counted_collectives(sent):
    """Make every all_reduce and broadcast of this process add its bytes to ``sent[0]``."""
    def counting(collective):
        def counted(tensor, *args, **kwargs):
            sent[0] += tensor.numel() * tensor.element_size()
            return collective(tensor, *args, **kwargs)
        return counted

    dist.all_reduce, dist.broadcast = counting(dist.all_reduce), counting(dist.broadcast)


def lowrank_worker(rank, world, folder, nan_steps=()):
    """The low-rank hook on ``world`` ranks: each step's weights, bytes (all collectives, and the hook's), and
    at each refresh this rank's own gradients and the bases after it. ``nan_steps``: rank 1's loss is NaN."""
    data, model, optimizer, ddp, state = join(rank, world, folder, True, lowrank_model_and_optimizer)
    sent = [0]
    counted_collectives(sent)
    share = GLOBAL_BATCH // world
    record = {"weights": [], "sent": [], "hook": [], "refreshes": [], "due": []}
    for step in range(LOW_STEPS):
        x, y = batch(step, data)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        phase = optimizer.reduced_phase
        if phase is not None and phase.refresh_due:
            record["due"].append(step)
        refresh = phase is not None and phase.refresh_due and step not in nan_steps
        if refresh:  # this rank's own gradients, as DDP hands them to the hook
            local = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), phase.projected)
            count = phase.refreshes
        before, hook_before = sent[0], state.bytes_sent
        loss = nn.functional.cross_entropy(ddp(x), y)
        if step in nan_steps and rank == 1:
            loss = loss * float("nan")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record["sent"].append(sent[0] - before)
        record["hook"].append(state.bytes_sent - hook_before)
        record["weights"].append([p.detach().clone() for p in model.parameters()])
        if refresh:
            record["refreshes"].append({"step": step, "count": count, "local": [g.clone() for g in local],
                                        "bases": [b.clone() for b in phase.map.bases]})
    phase = optimizer.reduced_phase
    record.update(ranks=[r for r in phase.ranks if r], refreshes_done=phase.refreshes,
                  skipped=optimizer.skipped_steps, errors=[e.clone() for e in state.errors.values()])
    torch.save(record, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def powersgd_worker(rank, world, folder):
    """torch's PowerSGD hook at rank 1 on the same model and batches: the bytes of each step. One bucket: its
    per-tensor choices do not depend on the buckets, and its later all-reduces, launched from the callbacks of
    the first, can interleave with the next bucket's in another order on each rank (gloo then aborts)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as power_sgd

    data, model, _, ddp, _ = join(rank, world, folder, False, lowrank_model_and_optimizer, bucket_cap_mb=25)
    state = power_sgd.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                    start_powerSGD_iter=LOW_WARMUP, random_seed=0)
    ddp.register_comm_hook(state, power_sgd.powerSGD_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sent = [0]
    counted_collectives(sent)
    share = GLOBAL_BATCH // world
    per_step = []
    for step in range(LOW_STEPS):
        x, y = batch(step, data)
        before, mine = sent[0], slice(rank * share, (rank + 1) * share)
        nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
        optimizer.step()
        optimizer.zero_grad()
        per_step.append(sent[0] - before)
    torch.save(per_step, os.path.join(folder, f"powersgd{rank}.pt"))
    leave_process_group()


def test_the_lowrank_hook_keeps_replicas_identical_and_sends_at_most_powersgd_rank_1s_bytes(tmp_path):
    mp.spawn(lowrank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    mp.spawn(powersgd_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    powersgd = torch.load(tmp_path / "powersgd0.pt", weights_only=True)
    assert ranks[0]["refreshes_done"] == 3 and len(ranks[0]["refreshes"]) >= 2
    for step, (mine, theirs) in enumerate(zip(ranks[0]["weights"], ranks[1]["weights"])):
        assert all(torch.equal(p, q) for p, q in zip(mine, theirs)), step  # identical after every step
    # the hook: per matrix r + D numbers (64 + 5, 32 + 4), m + n for the head (10 + 32), the biases whole
    hook = ranks[0]["hook"][LOW_WARMUP:]
    assert ranks[0]["ranks"] == [5, 4] and hook == [4 * (69 + 36 + 42 + 74)] * len(hook)
    # everything sent after the switch, the refreshes' broadcasts of d r numbers included, against PowerSGD
    after, theirs = ranks[0]["sent"][LOW_WARMUP:], powersgd[LOW_WARMUP:]
    assert max(hook) <= min(theirs) and sum(after) <= sum(theirs), (after, theirs)
    assert max(after) > max(hook)  # the refresh steps broadcast the bases


def test_a_refresh_under_the_lowrank_hook_takes_the_directions_of_the_first_ranks_own_gradient(tmp_path):
    mp.spawn(lowrank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, optimizer = lowrank_model_and_optimizer()
    matrices = [model[0].weight, model[2].weight]
    shapes, ranks_of = [tuple(p.shape) for p in matrices], ranks[0]["ranks"]
    for first, second in zip(ranks[0]["refreshes"], ranks[1]["refreshes"]):
        assert all(torch.equal(a, b) for a, b in zip(first["bases"], second["bases"]))
        for local, rank in ((first["local"], 0), (second["local"], 1)):
            found = SubspaceMap(shapes, ranks_of, torch.device("cpu"))
            found.refresh(dict(enumerate(local)), first["count"])
            close = [torch.allclose(a, b, atol=1e-5) for a, b in zip(found.bases, first["bases"])]
            assert all(close) if rank == 0 else not any(close), (rank, first["count"])


def test_a_nan_on_one_rank_under_the_lowrank_hook_reaches_no_weights(tmp_path):
    refresh_step = LOW_WARMUP + REFRESH_EVERY + 1  # would renew the bases (the first refused step delays it)
    nan_steps = (LOW_WARMUP + 3, refresh_step)
    mp.spawn(lowrank_worker, args=(2, str(tmp_path), nan_steps), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, _ = lowrank_model_and_optimizer()
    for record in ranks:
        weights = record["weights"]
        assert record["skipped"] == 2  # refused on both ranks, and only those steps
        for step in nan_steps:
            assert all(torch.equal(p, q) for p, q in zip(weights[step - 1], weights[step]))
        assert all(bool(torch.isfinite(p).all()) for p in weights[-1])
        assert all(bool(torch.isfinite(e).all()) for e in record["errors"])
        assert not any(torch.equal(p, q) for p, q in zip(weights[-2], weights[-1]))  # training goes on
        assert record["due"][:2] == [refresh_step, refresh_step + 1]  # the refresh refused with its step: next
        assert record["refreshes"][0]["step"] == refresh_step + 1
        assert max(record["hook"][LOW_WARMUP:]) < 4 * sum(p.numel() for p in model.parameters()) / 3
    for mine, theirs in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert all(torch.equal(p, q) for p, q in zip(mine, theirs))


def lowrank_no_sync_worker(rank, world, folder):
    data, model, optimizer, ddp, _ = join(rank, world, folder, True, lowrank_model_and_optimizer)
    record = step_after_no_sync(rank, world, data, model, optimizer, ddp, LOW_WARMUP + 2)
    torch.save(record, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def test_the_lowrank_phase_refuses_a_step_on_gradients_the_hook_did_not_exchange(tmp_path):
    mp.spawn(lowrank_no_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "found no gradients exchanged by the DDP hook" in result["outcome"] and result["unchanged"]


def expected_gradient(phase, p, g, error, q):
    """What the low-rank hook writes into ``p.grad`` on one process, by :func:`power_step_reference`: the lifted
    rank-1 step of the core gradient (a matrix trained in full: the gradient) plus ``error``, oriented with its
    long side last; and the error it leaves."""
    index = phase.subspace_of(p)
    total = (g if index is None else phase.map.project(index, g)) + error
    flip = total.shape[0] > total.shape[1]
    approx, _, (left,) = power_step_reference([total.T if flip else total], q)
    approx, left = (approx.T, left.T) if flip else (approx, left)
    return (approx if index is None else phase.map.lift(index, approx)).view_as(g), left


def test_the_lowrank_hook_on_one_process_compresses_deterministically_as_its_reference(one_rank):
    """World 1: the hook still compresses (as on N ranks, the average being this rank's own gradient): each
    step's ``.grad`` is the reference's, with the error the steps before left, rotated into the new bases by a
    refresh (none after a loaded state: a new phase, whose bases may be others); two runs are identical."""
    data, runs = datasets.digits(seed=0), []
    for _ in range(2):
        model, optimizer = lowrank_model_and_optimizer()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.004)
        state = register_cmd_hook(ddp, optimizer)
        # the first q of each matrix (on its long side) given, not drawn by the hook
        state.vectors.update({p: nn.functional.normalize(torch.randn(max(p.shape)), dim=0)
                              for p in model.parameters() if p.ndim == 2})
        errors, rotated = {}, 0
        for step in range(LOW_WARMUP + REFRESH_EVERY + 3):  # a refresh at step 20
            x, y = batch(step, data)
            if step == LOW_WARMUP + 5:
                optimizer.load_state_dict(optimizer.state_dict())
                errors = {}
            local = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            vectors = {p: q.clone() for p, q in state.vectors.items()}
            nn.functional.cross_entropy(ddp(x), y).backward()
            phase = optimizer.reduced_phase
            for p, g in zip(model.parameters(), local) if phase is not None else ():
                if p.ndim < 2:
                    assert torch.equal(p.grad, g)  # sent whole
                    continue
                expected, errors[p] = expected_gradient(phase, p, g, errors.get(p, 0), vectors[p])
                torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
                assert not torch.allclose(p.grad, g, atol=1e-4)  # compressed
            old = [b.clone() for b in phase.map.bases] if phase is not None else []
            optimizer.step()
            optimizer.zero_grad()
            for index, (before, after) in enumerate(zip(old, phase.map.bases if phase is not None else [])):
                if not torch.equal(before, after):  # refreshed: P_new^T P_old
                    p = phase.projected[index]
                    errors[p] = phase.map.rotate(index, errors[p], after.T @ before, second_moment=False)
                    rotated += 1
        assert len(errors) == 3 and rotated == 2  # both bases renewed
        runs.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def _hooked_run(data, steps, saved=None, load_hook=True, save_at=None):
    """World 1, the low-rank hook: train ``steps`` (a range), from ``saved`` (model, optimizer and hook states)
    if given; returns the final weights, the states after step ``save_at`` and the hook's state."""
    model, optimizer = lowrank_model_and_optimizer()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.004)
    state = register_cmd_hook(ddp, optimizer)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if load_hook:
            state.load_state_dict(saved["hook"])
    states = None
    for step in steps:
        x, y = batch(step, data)
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == save_at:  # a copy, as a checkpoint is (a state_dict holds the live tensors)
            states = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "hook": state.state_dict()})
    return [p.detach().clone() for p in model.parameters()], states, state


def test_the_lowrank_hooks_error_feedback_resumes_exactly(one_rank, tmp_path):
    """Saved right after a refresh (the errors still in the old bases until the next exchange), the hook's
    state_dict loads with weights_only=True, and a run resumed from it ends on the uninterrupted run's weights;
    resumed without it, the errors start afresh and the weights differ."""
    data, refresh, end = datasets.digits(seed=0), LOW_WARMUP + REFRESH_EVERY, LOW_WARMUP + REFRESH_EVERY + 6
    whole, saved, hook = _hooked_run(data, range(end), save_at=refresh)
    assert len(saved["hook"]["errors"]) == 3 and len(saved["hook"]["vectors"]) == 3
    torch.save(saved, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    resumed, _, again = _hooked_run(data, range(refresh + 1, end), saved)
    assert all(torch.equal(p, q) for p, q in zip(whole, resumed))
    assert again.bytes_sent == hook.bytes_sent  # (not the bucket calls: DDP rebuilds its buckets once per run)
    fresh, _, _ = _hooked_run(data, range(refresh + 1, end), saved, load_hook=False)
    assert not all(torch.equal(p, q) for p, q in zip(whole, fresh))


def test_a_bad_hook_state_is_refused_and_leaves_the_hook_as_it_was(one_rank):
    data = datasets.digits(seed=0)
    _, saved, state = _hooked_run(data, range(LOW_WARMUP + 3), save_at=LOW_WARMUP + 2)
    saved = saved["hook"]
    kept = (dict(state.errors), dict(state.vectors), state.bytes_sent)
    assert sorted(saved["errors"]) == ["0.weight", "2.weight", "4.weight"]  # two cores, the head in full
    bad = [({**saved, "extra": 1}, "expected the keys"), ({**saved, "errors": [1]}, "should be dicts"),
           ({**saved, "errors": {**saved["errors"], "nope.weight": torch.zeros(2, 2)}}, "'nope.weight'"),
           ({**saved, "errors": {**saved["errors"], "0.bias": torch.zeros(32)}}, "'0.bias'")]
    for name, error in saved["errors"].items():
        shape = tuple(error.shape)
        bad += [({**saved, "errors": {**saved["errors"], name: torch.zeros(shape[0] + 1, shape[1])}},
                 re.escape(f"errors[{name!r}] should be a tensor of shape {shape}")),
                ({**saved, "vectors": {**saved["vectors"], name: torch.zeros(max(shape) + 1)}},
                 re.escape(f"vectors[{name!r}] should be a tensor of shape {(max(shape),)}")),
                ({**saved, "vectors": {**saved["vectors"], name: torch.full((max(shape),), float("nan"))}},
                 "finite")]
    for state_dict, message in bad:
        with pytest.raises(ValueError, match=message):
            state.load_state_dict(state_dict)
        assert (state.errors, state.vectors, state.bytes_sent) == kept
    model, optimizer = lowrank_model_and_optimizer()  # still in its warm-up
    warm = register_cmd_hook(nn.parallel.DistributedDataParallel(model), optimizer)
    with pytest.raises(ValueError, match="load the optimizer's state_dict first"):
        warm.load_state_dict(saved)
    assert not warm.errors and not warm.vectors


def test_the_trainer_callback_saves_the_hook_state_per_rank_and_says_when_a_resume_lacks_it(one_rank, tmp_path):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from cmd_optim.integrations.hf import CMDCallback

    _, _, hook = _hooked_run(datasets.digits(seed=0), range(LOW_WARMUP + 3))
    args, at = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=13)
    callback = CMDCallback()
    callback.hook_state = hook
    callback.on_save(args, at, None)
    saved = torch.load(tmp_path / "checkpoint-13" / "cmd_hook_rank0.pt", weights_only=True)
    assert set(saved["errors"]) == {"0.weight", "2.weight", "4.weight"}
    hook.errors.clear()
    callback._resume_hook(args, at)  # found in output_dir/checkpoint-<step>
    assert len(hook.errors) == 3
    with pytest.warns(UserWarning, match="error feedback starts afresh"):
        callback._resume_hook(args, SimpleNamespace(global_step=14))
    callback.resume_from_checkpoint = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="holds no CMD hook state"):
        callback._resume_hook(args, at)


def test_power_step_reference_with_error_feedback_loses_nothing():
    """A rank-1 matrix comes back whole; over steps, what was sent plus the error left is what came in."""
    torch.manual_seed(0)
    u, v = torch.randn(5), torch.randn(9)
    start = torch.nn.functional.normalize(torch.randn(9), dim=0)
    approx, q, (error,) = power_step_reference([torch.outer(u, v)], start)
    torch.testing.assert_close(approx, torch.outer(u, v))
    assert error.abs().max() < 1e-5 and torch.allclose(q.abs(), (v / v.norm()).abs(), atol=1e-6)
    ranks = [[torch.randn(5, 9) for _ in range(4)] for _ in range(2)]
    errors, sent = [torch.zeros(5, 9)] * 2, torch.zeros(5, 9)
    q = torch.nn.functional.normalize(torch.randn(9), dim=0)
    for step in range(4):
        approx, q, errors = power_step_reference([ranks[k][step] + errors[k] for k in range(2)], q)
        sent += approx
    mean = sum(sum(steps) for steps in ranks) / 2
    torch.testing.assert_close(sent + sum(errors) / 2, mean)
