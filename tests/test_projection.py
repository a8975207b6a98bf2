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
    monkeypatch.setattr(projection, "CHUNK", 1000)  # many slices, ragged tails, both thread paths
    monkeypatch.setattr(projection, "PARALLEL_SLICES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: workers)
    shapes = [(37, 61), (5,), (2500,), (3, 7, 11)]
    p = _random_map(shapes, num_modes=num_modes, groups=[0, 1, 0, 1], sorted_modes=sorted_modes)
    assert p._workers == workers and p.lanes == min(8, 256 // num_modes)
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
    monkeypatch.setattr(projection, "CHUNK", 512)
    monkeypatch.setattr(projection, "PARALLEL_SLICES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    p = _random_map([(40_000,)])
    grads = [torch.randn(40_000, generator=torch.Generator().manual_seed(3))]
    first = p.project(grads)
    assert all(torch.equal(first, p.project(grads)) for _ in range(5))


def test_state_dict_keeps_the_modes():
    p = _random_map([(30, 7), (11,)], sorted_modes=True)
    q = ModeProjection.from_state_dict(p.state_dict(), [torch.empty(30, 7), torch.empty(11)])
    assert all(torch.equal(a, b) for a, b in zip(p.modes, q.modes))
    assert all(torch.equal(a, b) for a, b in zip(p.bins, q.bins))
