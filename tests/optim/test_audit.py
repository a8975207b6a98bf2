"""The second hostile audit's defects of the optimizer and the newcomer trial's, each from its reproduction."""

import warnings

import pytest
import torch
from torch import nn

from cmd_optim import CMDOptimizer, LowRank
from cmd_optim.optim import REDUCTIONS
from tests._helpers import roundtrip


def _data(inputs=32, classes=10):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(256, inputs, generator=gen), torch.randint(0, classes, (256,), generator=gen)


def _net(activation=nn.Tanh, inputs=32, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 64), activation(), nn.Linear(64, classes))


def _step(model, optimizer, data):
    x, y = data
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_e1_a_layer_frozen_over_the_switch_trains_once_unfrozen():
    data, m = _data(), _net()
    opt = CMDOptimizer(m, base=torch.optim.SGD, switch_after=30, lr=0.05, momentum=0.9)
    for _ in range(10):
        _step(m, opt, data)
    m[0].weight.requires_grad_(False)
    for _ in range(20):
        _step(m, opt, data)
    assert opt.phase == "reduced" and opt.switch_report["matrices"][0]["rank"] > 0
    m[0].weight.requires_grad_(True)
    w = m[0].weight.detach().clone()
    for _ in range(30):
        _step(m, opt, data)
    assert not torch.equal(w, m[0].weight)


def test_e1_the_live_rows_of_a_layer_with_dead_units_keep_training():
    data, m = _data(), _net(nn.ReLU)
    with torch.no_grad():
        m[0].bias[:39] = -50.0  # 39 of 64 hidden units dead
    opt = CMDOptimizer(m, base=torch.optim.SGD, switch_after=30, lr=0.05, momentum=0.9)
    for _ in range(30):
        _step(m, opt, data)
    w = m[0].weight.detach().clone()
    for _ in range(30):
        _step(m, opt, data)
    assert not torch.equal(w[39:], m[0].weight[39:])
    assert torch.equal(w[:39], m[0].weight[:39])  # dead rows get no gradient and stay


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_e1_a_warmup_without_a_backward_raises_at_the_switch_for_every_reduction(name):
    m = _net()
    opt = CMDOptimizer(m, base=torch.optim.SGD, switch_after=20, reduction=name, lr=0.05, momentum=0.9)
    for _ in range(19):
        opt.step()
    with pytest.raises(RuntimeError, match="no parameter got a gradient"):
        opt.step()
    assert opt.phase == "warmup"


def _snapshot_run():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = CMDOptimizer(m, base=torch.optim.SGD, modes=2, samples=50, switch_after=30, snapshot_every=5, lr=0.05,
                       momentum=0.9, snapshot_dtype=torch.float16)
    return m, opt


def _assert_step_undone(m, opt, before_weights, before_state, steps):
    assert opt.steps_taken == steps
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), before_weights))
    after = opt.state_dict()
    assert after["cmd"]["phase_state"]["snapshots"].shape[0] == steps // 5 + 1
    for key, entry in before_state["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in entry.items())
    torch.manual_seed(0)
    fresh_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fresh = CMDOptimizer(fresh_model, base=torch.optim.SGD, modes=2, samples=50, switch_after=30, snapshot_every=5,
                         lr=0.05, momentum=0.9, snapshot_dtype=torch.float16)
    fresh.load_state_dict(roundtrip(after))  # the checkpoint saved after the failure loads
    assert fresh.steps_taken == steps


def test_e2_a_snapshot_float16_cannot_hold_undoes_its_step():
    data = _data(8, 4)
    m, opt = _snapshot_run()
    for _ in range(12):
        _step(m, opt, data)
    with torch.no_grad():
        m[0].weight[0, 0] = 7e4  # beyond float16's range
    for _ in range(2):
        _step(m, opt, data)
    before_weights = [p.detach().clone() for p in m.parameters()]
    before_state = roundtrip(opt.state_dict())
    with pytest.raises(OverflowError):
        _step(m, opt, data)  # step 15 records a snapshot
    _assert_step_undone(m, opt, before_weights, before_state, 14)
    with torch.no_grad():
        m[0].weight[0, 0] = 1.0  # the user repairs the weight: the run goes on, snapshots evenly spaced
    for _ in range(20):
        _step(m, opt, data)
    assert opt.phase == "reduced" and opt.switch_report["snapshots"] == 7


def test_e2_a_snapshot_that_cannot_be_written_undoes_its_step(monkeypatch):
    data = _data(8, 4)
    m, opt = _snapshot_run()
    for _ in range(9):
        _step(m, opt, data)
    before_weights = [p.detach().clone() for p in m.parameters()]
    before_state = roundtrip(opt.state_dict())
    buffer = opt._phase.recorder.buffer

    def full_disk(params):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(buffer, "record", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _step(m, opt, data)
    _assert_step_undone(m, opt, before_weights, before_state, 9)


def _lowrank(refresh_every):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    return m, CMDOptimizer(m, base=torch.optim.SGD, switch_after=20, lr=0.05, momentum=0.9,
                           reduction=LowRank(refresh_every=refresh_every))


def test_e5_a_lowrank_state_beyond_a_shorter_refresh_period_or_damaged_is_refused_unchanged():
    data = _data()
    m, opt = _lowrank(5)
    for _ in range(29):
        _step(m, opt, data)
    saved = roundtrip(opt.state_dict())
    assert saved["cmd"]["phase_state"]["window_steps"] == 4
    damaged = []
    shorter = roundtrip(saved)
    damaged.append(("refresh", 3, shorter))
    truncated = roundtrip(saved)
    truncated["cmd"]["phase_state"]["bases"] = truncated["cmd"]["phase_state"]["bases"][:-1]
    damaged.append(("bases", 5, truncated))
    nan = roundtrip(saved)
    nan["cmd"]["phase_state"]["bases"][0][0, 0] = float("nan")
    damaged.append(("finite", 5, nan))
    ranks = roundtrip(saved)
    ranks["cmd"]["phase_state"]["ranks"] = ranks["cmd"]["phase_state"]["ranks"][:1]
    damaged.append(("ranks", 5, ranks))
    negative = roundtrip(saved)
    negative["cmd"]["phase_state"]["refreshes"] = -1
    damaged.append(("refreshes", 5, negative))
    for match, every, state in damaged:
        m2, o2 = _lowrank(every)
        for _ in range(3):
            _step(m2, o2, data)
        before = roundtrip(o2.state_dict())
        with pytest.raises(ValueError, match=match):
            o2.load_state_dict(state)
        now = o2.state_dict()
        assert now["cmd"]["phase"] == "warmup" and now["cmd"]["steps_taken"] == before["cmd"]["steps_taken"]
        assert all(torch.equal(v, now["state"][k]["momentum_buffer"])
                   for k, e in before["state"].items() for v in e.values())


def test_e12_a_huge_gradient_element_does_not_stop_later_refreshes():
    data = _data()
    m, opt = _lowrank(5)
    for i in range(60):
        x, y = data
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if i == 21:
            m[0].weight.grad[0, 0] = 1e5
        if i == 26:
            basis = opt.reduced_phase.map.bases[0].clone()
            refreshes = opt.reduced_phase.refreshes
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert opt.reduced_phase.refreshes >= refreshes + 6
    assert not torch.equal(basis, opt.reduced_phase.map.bases[0])


def test_c7_the_mode_switch_names_a_layer_frozen_over_the_whole_warmup():
    data, m = _data(), _net()
    opt = CMDOptimizer(m, base=torch.optim.SGD, modes=4, samples=100, switch_after=20, snapshot_every=5, lr=0.05)
    m[0].weight.requires_grad_(False)  # frozen after construction, for the whole warm-up
    for _ in range(19):
        _step(m, opt, data)
    with pytest.warns(RuntimeWarning, match=r"1 parameters did not move during the warm-up \(0.weight\)"):
        _step(m, opt, data)
    assert opt.phase == "reduced"


@pytest.mark.parametrize("reduction", ["modes", None])
def test_e6_an_lbfgs_step_undone_in_its_first_step_leaves_lbfgs_usable(reduction):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = CMDOptimizer(m, base=torch.optim.LBFGS, switch_after=30, snapshot_every=5, reduction=reduction, lr=0.5,
                       max_iter=4)
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        calls[0] += 1
        if calls[0] == 2:  # one bad line-search re-evaluation
            for p in m.parameters():
                p.grad.fill_(float("nan"))
        return loss

    start = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(m(x), y))
    opt.step(closure)
    assert opt.skipped_steps == 1 and all(torch.equal(p, s) for p, s in zip(m.parameters(), start))
    assert opt.inner_optimizer.state == {} or "prev_flat_grad" not in next(iter(opt.inner_optimizer.state.values()))
    for _ in range(5):
        opt.step(closure)
    with torch.no_grad():
        assert opt.steps_taken == 5 and float(nn.functional.cross_entropy(m(x), y)) < first


def test_d6_keep_free_patterns_match_a_compiled_models_parameters():
    m = _net()
    compiled = torch.compile(m)
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    opt = CMDOptimizer(compiled, base=torch.optim.SGD, switch_after=5, keep_free=["2.*"], lr=0.05, momentum=0.9)
    data = _data()
    for _ in range(5):
        _step(m, opt, data)  # the eager module's forward: the same parameters
    assert [entry["name"] for entry in opt.switch_report["matrices"]] in (["0.weight"], ["_orig_mod.0.weight"])


def test_d10_a_warmup_state_goes_back_to_a_plain_optimizer():
    data, m = _data(), _net()
    opt = CMDOptimizer(m, base=torch.optim.SGD, switch_after=50, keep_free=["2.*"], lr=0.05, momentum=0.9)
    for _ in range(5):
        _step(m, opt, data)
    groups = [{**g, "params": list(g["params"])} for g in opt.param_groups]
    plain = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    plain.load_state_dict(roundtrip(opt.inner_optimizer.state_dict()))
    reference = _net()
    reference.load_state_dict(m.state_dict())
    twin = CMDOptimizer(reference, base=torch.optim.SGD, switch_after=50, keep_free=["2.*"], lr=0.05, momentum=0.9)
    twin.load_state_dict(roundtrip(opt.state_dict()))
    for _ in range(3):
        _step(m, plain, data)
        _step(reference, twin, data)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), reference.parameters()))


def _e11_worker(rank, folder):
    """The audit's D-ddp-threads-lr case: rank 0 with 1 intra-op thread, rank 1 with 2 (heterogeneous hosts)."""
    import os

    import torch.distributed as dist

    from benchmarks.processes import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1 + rank)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 32), nn.Tanh(), nn.Linear(32, 10))
    ddp = nn.parallel.DistributedDataParallel(m)
    # the DDP module as the model declares the ranks replicas (docs/distributed.md, "Which ranks take part")
    opt = CMDOptimizer(ddp, switch_after=20, lr=0.05, momentum=0.9, reduction=LowRank(refresh_every=5))
    for s in range(40):
        x = torch.randn(32, 32, generator=torch.Generator().manual_seed(s * 2 + rank))
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), x[:, :10].argmax(1)).backward()
        opt.step()
    torch.save({"params": [p.detach() for p in m.parameters()], "phase": opt.phase, "threads": torch.get_num_threads(),
                "refreshes": opt.reduced_phase.refreshes}, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def test_e11_ddp_replicas_with_other_thread_counts_stay_bit_identical(tmp_path):
    """Before: 1.6e-7 apart after 20 reduced steps (LAPACK and BLAS round by thread count); plain DDP: 0."""
    import torch.multiprocessing as mp

    mp.spawn(_e11_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["phase"] for r in ranks] == ["reduced"] * 2 and ranks[0]["refreshes"] >= 3
    assert [r["threads"] for r in ranks] == [1, 2]  # each rank's own setting is restored after its steps
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)


def _warm(m, opt, steps, data):
    for _ in range(steps):
        _step(m, opt, data)


def test_a_plain_loop_is_told_of_the_switch_and_a_logger_replaces_the_notice(caplog):
    """Newcomer trial: nothing was said at the switch in a plain loop (an INFO record nobody shows)."""
    import logging

    from cmd_optim import SwitchNotice

    data, m = _data(), _net()
    opt = CMDOptimizer(m, switch_after=5, lr=0.05, momentum=0.9)
    with pytest.warns(SwitchNotice, match=r"switched to reduction 'lowrank' at step 5: \d+ trainable numbers"):
        _warm(m, opt, 6, data)
    data, m = _data(), _net()
    opt = CMDOptimizer(m, switch_after=5, lr=0.05, momentum=0.9)
    handler = logging.StreamHandler()
    logging.getLogger("cmd_optim").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="cmd_optim"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _warm(m, opt, 6, data)
    finally:
        logging.getLogger("cmd_optim").removeHandler(handler)
    assert any("switched to reduction 'lowrank' at step 5" in r.getMessage() for r in caplog.records)
    assert not [w for w in seen if issubclass(w.category, SwitchNotice)]


def test_an_optimizer_discarded_before_its_switch_says_it_trained_as_its_base():
    import gc

    from cmd_optim import SwitchNotice

    data, m = _data(), _net()
    opt = CMDOptimizer(m, base=torch.optim.AdamW, switch_after=50, lr=1e-3)
    _warm(m, opt, 3, data)
    with pytest.warns(SwitchNotice, match="after 3 steps before the switch at step 50: it trained as plain AdamW"):
        del opt
        gc.collect()
    opt = CMDOptimizer(m, switch_after=2, lr=0.05)
    _warm(m, opt, 3, data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        del opt
        gc.collect()
    assert not [w for w in seen if "before the switch" in str(w.message)]


def test_a_deprecated_alias_is_named_in_its_own_error():
    with pytest.raises(ValueError, match="warmup_steps must be"), pytest.warns(FutureWarning):
        CMDOptimizer(_net(), warmup_steps=0, lr=0.1)



@pytest.mark.parametrize("base_kwargs", [{}, {"momentum": 0.9}])
def test_c6_a_state_taken_inside_the_switch_resumes_bit_identically(monkeypatch, base_kwargs):
    """Audit S-mid-lo-SGD: a state_dict taken while the switch runs (a preemption handler) was resumed by
    building the bases from the next step's gradient (plain SGD, which keeps no first moment, with a fixed rank):
    9e-3 apart."""
    from cmd_optim.optim import lowrank

    data, m = _data(), _net()
    opt = CMDOptimizer(m, switch_after=10, lr=0.05, reduction=LowRank(rank=4, refresh_every=4), **base_kwargs)
    taken, start = [], lowrank.LowRank._start

    def interrupted(*args):
        taken.append((roundtrip(opt.state_dict()), [p.detach().clone() for p in m.parameters()]))
        return start(*args)

    monkeypatch.setattr(lowrank.LowRank, "_start", staticmethod(interrupted))
    _warm(m, opt, 10, data)
    monkeypatch.undo()
    (state, weights), = taken
    assert state["cmd"]["phase"] == "warmup" and state["cmd"]["steps_taken"] == 10
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(9)]
    resumed_model = _net()
    with torch.no_grad():
        for p, w in zip(resumed_model.parameters(), weights):
            p.copy_(w)
    resumed = CMDOptimizer(resumed_model, switch_after=10, lr=0.05, reduction=LowRank(rank=4, refresh_every=4),
                           **base_kwargs)
    resumed.load_state_dict(state)
    for batch in batches:
        _step(m, opt, batch)
        _step(resumed_model, resumed, batch)
    assert resumed.phase == "reduced" and resumed.reduced_phase.refreshes >= 2
    for p, q in zip(m.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_c6_a_damaged_switch_gradient_is_refused_and_changes_nothing(monkeypatch):
    from cmd_optim.optim import lowrank

    data, m = _data(), _net()
    opt = CMDOptimizer(m, switch_after=10, lr=0.05)
    taken, start = [], lowrank.LowRank._start
    monkeypatch.setattr(lowrank.LowRank, "_start", staticmethod(
        lambda *args: (taken.append(roundtrip(opt.state_dict())), start(*args))[1]))
    _warm(m, opt, 10, data)
    monkeypatch.undo()
    state = taken[0]
    assert len(state["cmd"]["phase_state"]["switch_gradients"]) == 2
    state["cmd"]["phase_state"]["switch_gradients"][0] = torch.zeros(3, 3)
    fresh = CMDOptimizer(_net(), switch_after=10, lr=0.05)
    before = roundtrip(fresh.state_dict())
    with pytest.raises(ValueError, match="switch_gradients"):
        fresh.load_state_dict(state)
    assert str(roundtrip(fresh.state_dict())) == str(before)
