"""Embedded CMD (reduction="gradual") under FSDP2: two gloo processes on the CPU against one process on the same
global batch through the warm-up and four embedding rounds, each rank's state falling round by round, the
collectives of a step, and resuming from sharded torch.distributed.checkpoints."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import datasets
from benchmarks.processes import leave_process_group
from cmd_optim import CMDOptimizer, Gradual
from tests.integrations.test_fsdp import (
    PATTERNS,
    join,
    load_checkpoint,
    model,
    one_process_step,
    save_checkpoint,
    sharded,
    train,
)

# a snapshot every 5 steps and a round at each one: rounds after steps 35, 40, 45 and 50
STEPS, SWITCH, WORLD, MODES = 50, 30, 2, 4
ROUNDS = (35, 40, 45, 50)
BASES = {"SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)), "AdamW": (torch.optim.AdamW, dict(lr=0.003)),
         "SGD-pooled": (torch.optim.SGD, dict(lr=0.05, momentum=0.9))}  # Gradual(embedded_gradient="pooled")
RUNS = [("SGD", "per block"), ("SGD", "one mesh"), ("AdamW", "per block"), ("AdamW", "one mesh"),
        ("SGD-pooled", "one mesh")]
CHECKPOINTS = (20, 33, 42)  # the warm-up; the reduced phase before the first round; after two rounds
RESUMED = [("SGD", "per block", 42), ("AdamW", "one mesh", 20), ("AdamW", "one mesh", 33), ("AdamW", "one mesh", 42),
           ("SGD-pooled", "one mesh", 42)]


def optimizer(net, base):
    cls, kwargs = BASES[base]
    reduction = Gradual(modes=MODES, samples=200, snapshot_every=5, every=1, fraction=0.3,
                        embedded_gradient="pooled" if base.endswith("-pooled") else "dropped")
    return CMDOptimizer(net, base=cls, reduction=reduction, switch_after=SWITCH, **kwargs)


def name(base, pattern):
    return f"{base}-{PATTERNS[pattern]}"


def whole_embedded(opt):
    """The embedded flags of the whole model, in one process's order (an all-gather per parameter)."""
    sharding, embedding = opt.sharding, opt.embedding
    pieces = embedding.embedded.to(torch.uint8).split(embedding.layout.sizes)
    return torch.cat([sharding.gather(piece.view(part.shape), index).reshape(-1)
                      for index, (piece, part) in enumerate(zip(pieces, embedding.params))]).bool()


def counting_all_reduces():
    """Wrap torch.distributed.all_reduce to record the size of every call; returns the list it fills."""
    calls, original = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    return calls


def whole_run(rank, world, folder):
    join(rank, world, folder, "whole")
    calls = counting_all_reduces()
    data = datasets.digits(seed=0)
    for base, pattern in RUNS:
        net = sharded(pattern)
        opt = optimizer(net, base)
        state_bytes, collectives = {}, {}
        for step in range(STEPS):
            before = len(calls)
            train(net, opt, data, step, step + 1, rank)
            collectives[step + 1] = calls[before:]
            state_bytes[step + 1] = opt.state_bytes
            if step + 1 in CHECKPOINTS:
                save_checkpoint(net, opt, os.path.join(folder, name(base, pattern)), step + 1)
        full = [p.full_tensor().detach() for p in net.parameters()]
        embedded = whole_embedded(opt)
        torch.save({"params": full, "embedded": embedded, "num_embedded": opt.embedding.num_embedded,
                    "trainable_dims": opt.trainable_dims, "state_bytes": state_bytes, "collectives": collectives,
                    "report": opt.switch_report}, os.path.join(folder, f"{name(base, pattern)}-{rank}.pt"))
    leave_process_group()


def resumed_runs(rank, world, folder):
    join(rank, world, folder, "resumed")
    for base, pattern, stop in RESUMED:
        net = sharded(pattern)
        opt = optimizer(net, base)
        load_checkpoint(net, opt, os.path.join(folder, name(base, pattern)), stop)
        assert opt.steps_taken == stop and opt.phase == ("warmup" if stop < SWITCH else "reduced")
        train(net, opt, datasets.digits(seed=0), stop, STEPS, rank)
        full = [p.full_tensor().detach() for p in net.parameters()]
        if rank == 0:
            torch.save({"params": full}, os.path.join(folder, f"{name(base, pattern)}-resumed-{stop}.pt"))
    leave_process_group()


def one_process(base):
    """The same training in one process, its loss the mean of the ranks' shares' losses (as FSDP averages)."""
    torch.set_num_threads(1)
    data = datasets.digits(seed=0)
    net = model()
    opt = optimizer(net, base)
    state_bytes = {}
    for step in range(STEPS):
        one_process_step(net, opt, data, step)
        state_bytes[step + 1] = opt.state_bytes
    return {"params": [p.detach() for p in net.parameters()], "embedded": opt.embedding.embedded.clone(),
            "trainable_dims": opt.trainable_dims, "state_bytes": state_bytes, "report": opt.switch_report}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp-gradual")
    mp.spawn(whole_run, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    mp.spawn(resumed_runs, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return folder


@pytest.fixture(scope="module")
def references():
    return {base: one_process(base) for base in BASES}


def load(folder, base, pattern, rank):
    return torch.load(folder / f"{name(base, pattern)}-{rank}.pt", weights_only=True)


@pytest.mark.parametrize(("base", "pattern"), RUNS)
def test_two_sharded_ranks_embed_and_train_as_one_process(runs, references, base, pattern):
    reference = references[base]
    for rank in range(WORLD):
        whole = load(runs, base, pattern, rank)
        # the same elements embedded, four rounds of 30% of the live non-references each
        assert torch.equal(whole["embedded"], reference["embedded"])
        assert whole["num_embedded"] == int(reference["embedded"].sum()) > 0.7 * reference["embedded"].numel()
        assert whole["trainable_dims"] == reference["trainable_dims"]
        floats = [k for k, v in reference["report"].items() if isinstance(v, float)]
        assert {k: v for k, v in whole["report"].items() if k not in floats} == \
            {k: v for k, v in reference["report"].items() if k not in floats}
        assert [whole["report"][k] for k in floats] == pytest.approx([reference["report"][k] for k in floats], rel=1e-5)
        for p, q in zip(whole["params"], reference["params"]):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("base", "pattern"), RUNS)
def test_each_rank_keeps_its_shards_state_falling_round_by_round(runs, references, base, pattern):
    one = references[base]["state_bytes"]
    for rank in range(WORLD):
        state_bytes = load(runs, base, pattern, rank)["state_bytes"]
        for step in ROUNDS:
            assert state_bytes[step] < state_bytes[step - 1]
        assert state_bytes[STEPS] < 0.6 * state_bytes[SWITCH + 1]
        for step in (SWITCH + 1, *ROUNDS):  # this rank's rows: about half of one process's state
            assert state_bytes[step] < 0.6 * one[step]


@pytest.mark.parametrize("base", BASES)
def test_a_reduced_step_sends_the_reference_values_and_a_round_its_ranking(runs, base):
    collectives = load(runs, base, "one mesh", 0)["collectives"]
    pooled = base.endswith("-pooled")  # first the embedded elements' mode sums; after a round their sum a^2
    for step in range(SWITCH + 1, STEPS + 1):
        if step in ROUNDS:  # the references' values; float32 drifts: 4 bytes of 256 counts, the ties per
            # parameter and rank; then the online fit's update reuses the values
            assert collectives[step] == [MODES] * pooled + [1, MODES, 256, 256, 256, 256, WORLD * 6] + \
                [MODES] * pooled
        else:  # the agreed non-finite check, and the references' values
            assert collectives[step] == [MODES] * pooled + [1, MODES]


@pytest.mark.parametrize(("base", "pattern", "stop"), RESUMED)
def test_resume_from_a_sharded_checkpoint_ends_on_the_same_weights(runs, base, pattern, stop):
    whole = load(runs, base, pattern, 0)
    resumed = torch.load(runs / f"{name(base, pattern)}-resumed-{stop}.pt", weights_only=True)
    for p, q in zip(whole["params"], resumed["params"]):
        assert torch.equal(p, q)
