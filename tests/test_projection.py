import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cmd_optim import projection
from cmd_optim.projection import ModeProjection


def _random_map(shapes, num_modes=10, groups=None, sorted_modes=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coefficients = [torch.randn(s, generator=gen) for s in shapes]
    modes = [torch.randint(0, num_modes, s, generator=gen, dtype=torch.uint8) for s in shapes]
    if sorted_modes:  # long runs of one mode, as whole rows of a real layer have
        modes = [m.reshape(-1).sort().values.view(s) for m, s in zip(modes, shapes)]
    groups = groups or [0] * len(shapes)
    return ModeProjection(coefficients, modes, groups, num_modes, max(groups) + 1)


def _small_blocks(monkeypatch, chunk):
    """Many work items, ragged tails, packed and sliced parameters, the threaded path from any size."""
    monkeypatch.setattr(projection, "CHUNK", chunk)
    monkeypatch.setattr(projection, "PACK_BELOW", chunk // 4)
    monkeypatch.setattr(projection, "PARALLEL_ELEMENTS", 1)


def _dense_project(p, grads):
    out = torch.zeros(p.num_groups, p.num_modes, dtype=torch.float64)
    for u, m, group, g in zip(p.coefficients, p.modes, p.groups, grads):
        for mode in range(p.num_modes):
            mask = m == mode
            out[group, mode] += (u[mask].double() * g[mask].double()).sum()
    norms = torch.zeros_like(out)
    for u, m, group in zip(p.coefficients, p.modes, p.groups):
        for mode in range(p.num_modes):
            norms[group, mode] += u[m == mode].double().square().sum()
    return torch.where(norms > 0, out / norms, 0)  # a (group, mode) pair with no member gets 0


@pytest.mark.parametrize("num_modes", [10, 100])  # 8 histogram lanes per mode, and 2
@pytest.mark.parametrize("sorted_modes", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_project_and_apply_match_the_dense_formulas(monkeypatch, sorted_modes, workers, num_modes):
    _small_blocks(monkeypatch, chunk=1000)
    shapes = [(37, 61), (5,), (2500,), (3, 7, 11)]
    p = _random_map(shapes, num_modes=num_modes, groups=[0, 1, 0, 1], sorted_modes=sorted_modes)
    p._workers = workers
    assert p.lanes == min(8, 256 // num_modes)
    # (37, 61) and (2500,) are sliced alone; (5,) and (3, 7, 11) share a block of group 1
    assert sorted(b.members for b in p._blocks) == [[0], [1, 3], [2]]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    torch.testing.assert_close(p.project(grads).double(), _dense_project(p, grads), rtol=1e-5, atol=1e-6)

    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    before = [q.detach().clone() for q in params]
    for q, g in zip(params, grads):
        q.grad = g
    params[1].grad = None  # a parameter without a gradient stays where it is
    delta = torch.randn(2, num_modes, generator=gen)
    p.apply(params, delta)
    for index, (q, old, u, m, group) in enumerate(zip(params, before, p.coefficients, p.modes, p.groups)):
        expected = old if index == 1 else old + u * delta[group][m.long()]
        torch.testing.assert_close(q.detach(), expected)


def test_project_is_deterministic_across_calls_with_threads(monkeypatch):
    _small_blocks(monkeypatch, chunk=512)
    p = _random_map([(40_000,)])
    p._workers = 2
    grads = [torch.randn(40_000, generator=torch.Generator().manual_seed(3))]
    first = p.project(grads)
    assert all(torch.equal(first, p.project(grads)) for _ in range(5))


def test_threaded_steps_leave_the_thread_settings_alone(monkeypatch):
    """Each share runs single-threaded; the caller's intra-op thread count, and the count a new thread
    starts with, are what they were."""
    _small_blocks(monkeypatch, chunk=512)
    p = _random_map([(5_000,)])
    p._workers = 2
    before = torch.get_num_threads()
    p.project([torch.randn(5_000)])
    p.apply([torch.nn.Parameter(torch.randn(5_000))], torch.randn(1, 10))
    assert torch.get_num_threads() == before
    with ThreadPoolExecutor(1) as fresh:
        assert fresh.submit(torch.get_num_threads).result() == before


def test_a_failing_share_raises_after_every_share_finished(monkeypatch):
    _small_blocks(monkeypatch, chunk=512)
    p = _random_map([(5_000,)])
    p._workers = 2
    finished = []

    def work(worker):
        if worker == 0:
            raise RuntimeError("share 0 failed")
        time.sleep(0.2)
        finished.append(worker)

    with pytest.raises(RuntimeError, match="share 0 failed"):
        p._run(work)
    assert finished == [1]


def test_state_dict_keeps_the_modes():
    p = _random_map([(30, 7), (11,)], sorted_modes=True)
    q = ModeProjection.from_state_dict(p.state_dict(), [torch.empty(30, 7), torch.empty(11)])
    assert all(torch.equal(a, b) for a, b in zip(p.modes, q.modes))
    assert all(torch.equal(a, b) for a, b in zip(p.bins, q.bins))


def test_blocks_pack_small_parameters_of_one_group_up_to_a_chunk(monkeypatch):
    _small_blocks(monkeypatch, chunk=100)
    shapes = [(20,), (20,), (20,), (20,), (24,), (30,), (2, 3), (5,)]  # 25 elements or more: alone
    p = _random_map(shapes, groups=[0, 0, 0, 0, 0, 0, 1, 1])
    assert [b.members for b in p._blocks] == [[0, 1, 2, 3], [5], [4], [6, 7]]
    assert [b.group for b in p._blocks] == [0, 0, 0, 1]
    for block in p._blocks:  # the per-parameter tensors are views of their block, no copies
        for i in block.members:
            assert p.coefficients[i].untyped_storage().data_ptr() == block.u.untyped_storage().data_ptr()
            assert p.coefficients[i].shape == shapes[i]


def test_mode_sums_over_parts_add_up(monkeypatch):
    """A DDP bucket passes some gradients and None for the rest, also inside a packed block."""
    _small_blocks(monkeypatch, chunk=1000)
    shapes = [(300,), (7,), (40,), (2000,), (9, 9)]
    p = _random_map(shapes, groups=[0, 0, 1, 1, 1])
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    parts = [[g if i in part else None for i, g in enumerate(grads)] for part in ({0, 3}, {1, 2}, {4})]
    torch.testing.assert_close(sum(p.mode_sums(part) for part in parts), p.mode_sums(grads))
    torch.testing.assert_close(p.project(grads).double(), _dense_project(p, grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_in_packed_blocks(dtype):
    shapes = [(50,), (8, 8), (3,)]
    p = _random_map(shapes)
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for q in params:
        q.grad = torch.randn(q.shape, generator=gen).to(dtype)
    grads = [q.grad.float() for q in params]
    torch.testing.assert_close(p.project([q.grad for q in params]).double(), _dense_project(p, grads), rtol=1e-5, atol=1e-6)
    before = [q.detach().float() for q in params]
    delta = torch.randn(1, 10, generator=gen)
    p.apply(params, delta)
    for q, old, u, m in zip(params, before, p.coefficients, p.modes):
        assert q.dtype == dtype
        torch.testing.assert_close(q.detach().float(), (old + u * delta[0][m.long()]).to(dtype).float())
