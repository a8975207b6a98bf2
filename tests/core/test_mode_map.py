import pytest
import torch

from cmd_optim.core import ModeMap, kernels

#: every backend this installation has, and the readable reference they are held to
KERNELS = ["torch", "reference"] + [name for name in ("native", "triton") if kernels.available()[name]]


def _random_map(shapes, num_modes=10, groups=None, sorted_modes=False, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    slopes = [torch.randn(s, generator=gen) for s in shapes]
    modes = [torch.randint(0, num_modes, s, generator=gen, dtype=torch.uint8) for s in shapes]
    if sorted_modes:  # long runs of one mode, as whole rows of a real layer have
        modes = [m.reshape(-1).sort().values.view(s) for m, s in zip(modes, shapes)]
    groups = groups or [0] * len(shapes)
    return ModeMap(slopes, modes, groups, num_modes, max(groups) + 1, **kwargs)


SMALL_BLOCKS = dict(chunk=1000, pack_below=250)  # many work items, ragged tails, packed and sliced parameters


def _dense_project(p, grads):
    """The formula, coefficient by coefficient: sum u g / sum u^2 over the members of (group, mode)."""
    out = torch.zeros(p.num_groups, p.num_modes, dtype=torch.float64)
    norms = torch.zeros_like(out)
    for u, m, group, g in zip(p.slopes, p.modes, p.groups, grads):
        for mode in range(p.num_modes):
            mask = m == mode
            out[group, mode] += (u[mask].double() * g[mask].double()).sum()
            norms[group, mode] += u[mask].double().square().sum()
    return torch.where(norms > 0, out / norms, 0).reshape(-1)  # a coefficient with no member gets 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_modes", [10, 100])  # 8 histogram lanes per mode, and 2
@pytest.mark.parametrize("sorted_modes", [False, True])
def test_project_and_lift_match_the_dense_formulas(sorted_modes, num_modes, kernel):
    shapes = [(37, 61), (5,), (2500,), (3, 7, 11)]
    p = _random_map(shapes, num_modes=num_modes, groups=[0, 1, 0, 1], sorted_modes=sorted_modes, kernel=kernel,
                    **SMALL_BLOCKS)
    assert p.num_coefficients == 2 * num_modes
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    torch.testing.assert_close(p.project(grads).double(), _dense_project(p, grads), rtol=1e-5, atol=1e-6)

    params = [torch.randn(s, generator=gen) for s in shapes]
    before = [q.clone() for q in params]
    delta = torch.randn(2 * num_modes, generator=gen)
    p.lift_([q if i != 1 else None for i, q in enumerate(params)], delta)  # None: left alone
    for index, (q, old, u, m, group) in enumerate(zip(params, before, p.slopes, p.modes, p.groups)):
        expected = old if index == 1 else old + u * delta.view(2, num_modes)[group][m.long()]
        torch.testing.assert_close(q, expected)


def test_small_parameters_of_one_group_share_blocks_up_to_a_chunk():
    shapes = [(20,), (20,), (20,), (20,), (24,), (30,), (2, 3), (5,)]  # 25 elements or more: alone
    p = _random_map(shapes, groups=[0, 0, 0, 0, 0, 0, 1, 1], chunk=100, pack_below=25)
    blocks = p._packed.blocks
    assert [b.members for b in blocks] == [[0, 1, 2, 3], [4], [5], [6, 7]]  # consecutive: slices of flat storage
    assert [b.group for b in blocks] == [0, 0, 0, 1]
    for block in blocks:  # the per-parameter tensors are views of their block, no copies
        for i in block.members:
            assert p.slopes[i].untyped_storage().data_ptr() == block.slopes.untyped_storage().data_ptr()
            assert p.slopes[i].shape == shapes[i]


@pytest.mark.parametrize("kernel", KERNELS)
def test_mode_sums_over_parts_add_up(kernel):
    """A DDP bucket passes some gradients and None for the rest, also inside a packed block."""
    shapes = [(300,), (7,), (40,), (2000,), (9, 9)]
    p = _random_map(shapes, groups=[0, 0, 1, 1, 1], kernel=kernel, **SMALL_BLOCKS)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    parts = [[g if i in part else None for i, g in enumerate(grads)] for part in ({0, 3}, {1, 2}, {4})]
    torch.testing.assert_close(sum(p.mode_sums(part) for part in parts), p.mode_sums(grads))
    torch.testing.assert_close(p.mode_sums(grads), p.mode_sums_reference(grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_and_the_absolute_placement(dtype, kernel):
    shapes = [(50,), (8, 8), (3,)]
    p = _random_map(shapes, kernel=kernel)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    torch.testing.assert_close(p.project(grads).double(), _dense_project(p, [g.float() for g in grads]),
                               rtol=1e-5, atol=1e-6)
    origins = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params = [o.clone() for o in origins]
    total = torch.randn(10, generator=gen)
    p.place_(params, origins, total)
    for q, origin, u, m in zip(params, origins, p.slopes, p.modes):
        assert q.dtype == dtype
        torch.testing.assert_close(q, (origin.float() + u * total[m.long()]).to(dtype))


def test_strided_parameters_move_in_place():
    """A channels_last weight cannot be viewed flat; it still moves, in place, by the formula."""
    weight = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    p = _random_map([tuple(weight.shape)])
    before, storage = weight.clone(), weight.untyped_storage().data_ptr()
    delta = torch.randn(10)
    p.lift_([weight], delta)
    assert weight.untyped_storage().data_ptr() == storage and not weight.is_contiguous()
    torch.testing.assert_close(weight, before + p.slopes[0] * delta[p.modes[0].long()])


def test_state_dict_round_trip_and_checks():
    p = _random_map([(30, 7), (11,)], sorted_modes=True)
    params = [torch.empty(30, 7), torch.empty(11)]
    q = ModeMap.from_state_dict(p.state_dict(), params)
    assert all(torch.equal(a, b) for a, b in zip(p.modes, q.modes))
    assert all(torch.equal(a, b) for a, b in zip(p.slopes, q.slopes))
    with pytest.raises(ValueError, match="covers 2 parameters, this optimizer maps 1"):
        ModeMap.from_state_dict(p.state_dict(), params[:1])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(30, 7\), the parameter \(31, 7\)"):
        ModeMap.from_state_dict(p.state_dict(), [torch.empty(31, 7), torch.empty(11)])
    bad = p.state_dict()
    bad["slopes"] = [bad["slopes"][0].clone().fill_(float("nan")), bad["slopes"][1]]
    with pytest.raises(ValueError, match="non-finite slopes"):
        ModeMap.from_state_dict(bad, params)


def test_more_than_256_modes_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at most 256 modes .one byte per parameter"):
        ModeMap([torch.ones(3)], [torch.zeros(3, dtype=torch.uint8)], [0], 300, 1)


def test_the_backend_is_named_and_can_be_forced(monkeypatch):
    assert kernels.backend("cpu") == ("native" if kernels.available()["native"] else "torch")
    monkeypatch.setenv("CMD_OPTIM_KERNELS", "torch")
    assert kernels.backend("cpu") == "torch"
    assert _random_map([(10,)]).kernel == "torch"
