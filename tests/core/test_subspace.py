"""The one-sided subspace map: its fused step against the readable reference, refreshes and rotations."""

import pytest
import torch

from cmd_optim.core import SubspaceMap
from cmd_optim.core.subspace import (
    apply_step,
    apply_step_reference,
    lift_reference,
    live_rows,
    project,
    project_reference,
    residual_scale,
    rotate_state,
    top_directions,
)


def _orthonormal(d, r, seed):
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed))).Q


def _step_case(shape, seed):
    """A rank-3 basis of a (m, n) matrix, a gradient, its projection and a core step: (generator, left, basis,
    grad, low, step)."""
    m, n = shape
    left = m <= n
    gen = torch.Generator().manual_seed(seed)
    basis = _orthonormal(min(m, n), 3, seed + 1)
    grad = torch.randn(m, n, generator=gen)
    low = project_reference(basis, left, grad)
    return gen, left, basis, grad, low, -0.1 * torch.sign(low) * torch.rand(low.shape, generator=gen)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_the_fused_step_is_the_reference_step(shape, residual, gain):
    gen, left, basis, grad, low, step = _step_case(shape, 1)
    weight = torch.randn(shape, generator=gen)
    expected, fused = weight.clone(), weight.clone()
    unit = weight.clone()
    apply_step_reference(unit, basis, left, step, grad if residual else None, low if residual else None)
    apply_step_reference(expected, basis, left, step, grad if residual else None, low if residual else None,
                         gain=gain)
    apply_step(fused, basis, left, step, grad if residual else None, low if residual else None, kernel="fused",
               gain=gain)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(expected - weight, gain * (unit - weight), rtol=1e-5, atol=1e-6)
    moved = (expected - weight)
    inside = lift_reference(basis, left, project_reference(basis, left, moved))
    if residual:
        assert not torch.allclose(inside, moved, atol=1e-5)  # the residual leaves the subspace
    else:
        torch.testing.assert_close(inside, moved, atol=1e-6, rtol=1e-5)  # a move inside span(P)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_keep_is_decoupled_decay_before_the_move(shape, kernel):
    """``keep`` scales W as AdamW's decay does, then the move lands: the same as ``W *= keep`` and a step
    without it (the fused path folds it into its GEMM's beta), also for a non-contiguous float64 weight."""
    gen, left, basis, grad, low, step = _step_case(shape, 3)
    m, n = shape
    for weight in (torch.randn(m, n, generator=gen), torch.randn(n, m, generator=gen, dtype=torch.float64).T):
        expected, kept = weight.clone(), weight.clone()
        expected.mul_(0.93)
        apply_step_reference(expected, basis, left, step, grad, low, gain=2.0)
        apply_step(kept, basis, left, step, grad, low, kernel=kernel, gain=2.0, keep=0.93)
        torch.testing.assert_close(kept, expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(kept, weight + (expected - 0.93 * weight) / 0.93, atol=1e-4)  # keep acted


@pytest.mark.parametrize("live", [3, 40])
@pytest.mark.parametrize("residual", [False, True])
def test_a_tall_matrix_with_rows_of_no_gradient_steps_as_the_reference(live, residual):
    """A vocabulary-like (80, 6) matrix whose gradient has ``live`` nonzero rows (3: the row-sparse path; 40 of 80:
    the dense one), its core step nonzero on two more rows (a moment of earlier steps): the fused projection and
    move equal the reference's, and the rows with neither gradient nor step only decay."""
    m, n = 80, 6
    gen = torch.Generator().manual_seed(7)
    basis = _orthonormal(n, 3, 8)
    rows = torch.randperm(m, generator=gen)[:live]
    grad = torch.zeros(m, n)
    grad[rows] = torch.randn(live, n, generator=gen)
    assert live_rows(grad) is None if 2 * live > m else torch.equal(live_rows(grad), rows.sort().values)
    low = project(basis, False, grad)
    torch.testing.assert_close(low, project_reference(basis, False, grad), rtol=1e-6, atol=1e-7)
    step = -0.1 * low
    step[rows[0] - 1] = 0.05  # rows moved by the core's state though this step's gradient is 0 there
    step[(rows[0] + 7) % m] = -0.02
    weight = torch.randn(m, n, generator=gen)
    expected, fused = weight.clone(), weight.clone()
    args = (grad, low) if residual else (None, None)
    apply_step_reference(expected, basis, False, step, *args, gain=1.5, keep=0.9)
    apply_step(fused, basis, False, step, *args, kernel="fused", gain=1.5, keep=0.9)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    still = (grad.ne(0).any(1) | step.ne(0).any(1)).logical_not()
    torch.testing.assert_close(fused[still], 0.9 * weight[still])


def test_the_row_sparse_path_is_for_tall_right_side_matrices_on_the_cpu_only():
    """Finding a tall matrix's live rows costs a host sync, so off the CPU (here the meta device) every row is
    taken, as for a matrix that is not tall or is projected on its left."""
    from cmd_optim.core.subspace import TALL, _tall

    assert _tall(False, torch.empty(TALL * 6, 6))
    assert not _tall(False, torch.empty(TALL * 6, 6, device="meta"))
    assert not _tall(False, torch.empty(TALL * 6 - 1, 6))
    assert not _tall(True, torch.empty(TALL * 6, 6))


@pytest.mark.parametrize("shape", [(9, 20), (20, 9)])
def test_row_blocks_give_the_whole_matrix_projection_carry_and_step(shape):
    """A matrix split by rows (FSDP2's shards, uneven): the blocks' left projections and carries sum to the
    whole one, a right projection's blocks are its rows, and each block's step (given the whole core's norm
    ratio) is the whole step's rows."""
    m, n = shape
    gen = torch.Generator().manual_seed(5)
    subspaces = SubspaceMap([shape], [3], torch.device("cpu"), bases=[_orthonormal(min(m, n), 3, 6)])
    left = subspaces.is_left(0)
    grad, moment, weight = (torch.randn(m, n, generator=gen) for _ in range(3))
    blocks = [(0, 5), (5, m)]
    low = subspaces.project(0, grad)
    parts = [subspaces.project(0, grad[a:b], rows=(a, b)) for a, b in blocks]
    carried = [subspaces.carry(0, moment[a:b], True, rows=(a, b)) for a, b in blocks]
    if left:
        torch.testing.assert_close(sum(parts), low, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(carried), subspaces.carry(0, moment, True), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(torch.cat(parts), low)
    step = -0.1 * torch.sign(low) * torch.rand(low.shape, generator=gen)
    whole = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(low)
    expected = weight.clone()
    subspaces.apply(0, expected, step, grad, low)
    for a, b in blocks:
        block = weight[a:b].clone()
        subspaces.apply(0, block, step if left else step[a:b], grad[a:b], low if left else low[a:b], rows=(a, b),
                        whole=None if left else whole)
        torch.testing.assert_close(block, expected[a:b], rtol=1e-5, atol=1e-6)


def test_the_residual_scale_reproduces_a_plain_sgd_step():
    """With step = -lr * projected gradient, the move is exactly -lr * G: nothing of the gradient is lost."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((5, 12), (12, 5)):
        m, n = shape
        left = m <= n
        basis = _orthonormal(min(m, n), 2, 4)
        grad, weight = torch.randn(m, n, generator=gen), torch.zeros(m, n)
        low = project_reference(basis, left, grad)
        apply_step(weight, basis, left, -0.3 * low, grad, low)
        torch.testing.assert_close(weight, -0.3 * grad, rtol=1e-5, atol=1e-6)
        scale = residual_scale(-0.3 * low, low, left)
        assert scale.shape == ((1, n) if left else (m, 1))


def test_a_zero_gradient_line_gets_no_residual_and_no_nan():
    basis = _orthonormal(4, 2, 0)
    grad = torch.zeros(4, 6)
    low = project_reference(basis, True, grad)
    weight = torch.ones(4, 6)
    apply_step(weight, basis, True, torch.zeros_like(low), grad, low)
    assert torch.equal(weight, torch.ones(4, 6))


@pytest.mark.parametrize("left", [True, False])
def test_top_directions_span_the_dominant_subspace_exactly_or_by_the_range_finder(left):
    gen = torch.Generator().manual_seed(5)
    u, v = _orthonormal(60, 3, 6), _orthonormal(80, 3, 7)
    source = u @ torch.diag(torch.tensor([10.0, 5.0, 2.0])) @ v.T + 1e-3 * torch.randn(60, 80, generator=gen)
    source = source if left else source.T
    truth = u
    for rank in (3, 2):  # 3 * 4 < 60: the randomised path; both find the planted directions
        found = top_directions(source, rank, left, seed=1)
        assert found.shape == (60, rank)
        torch.testing.assert_close(found.T @ found, torch.eye(rank), atol=1e-5, rtol=0)
        assert float(torch.linalg.matrix_norm(truth @ (truth.T @ found) - found)) < 1e-2
    assert top_directions(torch.zeros(5, 7), 2, True, seed=0) is None
    assert top_directions(torch.full((5, 7), float("nan")), 2, True, seed=0) is None


@pytest.mark.parametrize(("shape", "signal", "rank"), [((4, 128), 3, 4), ((128, 4), 3, 4), ((60, 400), 5, 8)])
def test_a_direction_that_is_rounding_noise_is_a_zero_column(shape, signal, rank):
    """A softmax head's gradient has rank C - 1 (its rows sum to 0): its last direction is noise, and no core
    trains along it (audit E11). The 60 x 400 case (true rank 5, rank 8) takes the range finder."""
    gen = torch.Generator().manual_seed(0)
    d, wide = min(shape), max(shape)
    if signal == d - 1:
        rows = torch.randn(d, wide, generator=gen)
        source = rows - rows.mean(0)
    else:
        source = torch.randn(d, signal, generator=gen) @ torch.randn(signal, wide, generator=gen)
    left = shape[0] <= shape[1]
    found = top_directions(source if left else source.T, rank, left, seed=0)
    norms = torch.linalg.vector_norm(found, dim=0)
    torch.testing.assert_close(norms[:signal], torch.ones(signal))
    assert torch.equal(norms[signal:], torch.zeros(rank - signal))


def test_the_agreement_callback_overwrites_the_bases_before_the_rotations():
    source = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    subspaces = SubspaceMap([(20, 30), (30, 20)], [3, 3], torch.device("cpu"))
    agreed = _orthonormal(20, 3, 9)
    seen = []

    def agree(bases):
        seen.append(len(bases))
        bases[0].copy_(agreed)

    rotations = subspaces.refresh({0: source, 1: source.T}, count=0, agree=agree)
    assert seen == [2]
    assert torch.equal(subspaces.bases[0], agreed)
    torch.testing.assert_close(rotations[0], agreed.T @ torch.eye(20, 3))
    assert subspaces.refresh({0: torch.zeros(20, 30)}, count=1) == {}  # no signal: the basis stays


def test_refreshes_are_seeded_and_leave_the_global_rng_alone():
    source = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    bases = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        state = torch.random.get_rng_state()
        subspaces = SubspaceMap([(200, 300)], [8], torch.device("cpu"), seed=3)
        subspaces.refresh({0: source}, count=2)
        assert torch.equal(torch.random.get_rng_state(), state)
        bases.append(subspaces.bases[0])
    assert torch.equal(*bases)


def test_a_rotation_carries_a_first_moment_exactly_when_the_new_basis_spans_the_old():
    old = _orthonormal(10, 3, 1)
    mixing = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2))).Q
    new = old @ mixing  # the same subspace, other coordinates
    moment = torch.randn(3, 7)
    rotation = new.T @ old
    rotated = rotate_state(moment, rotation, left=True, second_moment=False)
    torch.testing.assert_close(new @ rotated, old @ moment, atol=1e-5, rtol=1e-5)  # the same full-space moment
    second = rotate_state(moment.square(), rotation, left=True, second_moment=True)
    assert bool((second >= 0).all())


def test_the_map_refuses_ranks_and_bases_that_do_not_fit():
    with pytest.raises(ValueError, match=r"rank 5 of matrix 0 \(4 x 9\) must be in \[1, 4\]"):
        SubspaceMap([(4, 9)], [5], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the basis of matrix 0 must be \(4, 2\)"):
        SubspaceMap([(4, 9)], [2], torch.device("cpu"), bases=[torch.zeros(9, 2)])
    with pytest.raises(ValueError, match="kernel must be one of"):
        SubspaceMap([(4, 9)], [2], torch.device("cpu"), kernel="cuda")
