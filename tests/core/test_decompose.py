import io
from collections import Counter

import numpy as np
import pytest
import torch

from cmd_optim import Decomposition, decompose
from cmd_optim.core import sample_columns

NOISE = 1e-3


def planted(num_params=20000, snapshots=20, seed=0, dtype=torch.float32):
    """Trajectories that are exact affine images of four hidden profiles, plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, snapshots, dtype=torch.float64)
    profiles = torch.stack([torch.sin(6 * t), t**2, torch.cos(11 * t), torch.sin(17 * t + 1)])
    mode = torch.randint(0, 4, (num_params,), generator=gen)
    # slopes bounded away from 0, so that no planted column is pure noise
    magnitude = 0.5 + 1.5 * torch.rand(num_params, generator=gen, dtype=torch.float64)
    a = magnitude * torch.randint(0, 2, (num_params,), generator=gen).mul(2).sub(1)
    b = torch.randn(num_params, generator=gen, dtype=torch.float64)
    noise = NOISE * torch.randn(snapshots, num_params, generator=gen, dtype=torch.float64)
    clean = a * profiles[mode].T + b
    return (clean + noise).to(dtype), mode, noise


def purity(found, truth, num_modes):
    hits = sum(Counter(truth[found == k].tolist()).most_common(1)[0][1] for k in range(num_modes) if (found == k).any())
    return hits / truth.numel()


def batch_fit(trajectory, d):
    """Least-squares a, b of every column on its assigned reference, in float64 NumPy."""
    w = trajectory.double().numpy()
    r = w[:, d.references.numpy()][:, d.assignment.numpy()]
    rc = r - r.mean(0)
    var = (rc**2).sum(0)
    a = np.where(var > 0, (rc * (w - w.mean(0))).sum(0) / np.where(var > 0, var, 1), 0)
    return a, w.mean(0) - a * r.mean(0)


def test_planted_modes_are_recovered():
    trajectory, truth, noise = planted()
    d = decompose(trajectory, modes=4, samples=500, seed=0)
    assert d.num_modes == 4
    assert purity(d.assignment, truth, d.num_modes) >= 0.99
    noise_level = noise.norm(dim=1) / trajectory.double().norm(dim=1)
    error = d.relative_error(trajectory).double()
    assert error.shape == (20,)
    # The reference of a mode is itself a noisy column, and its noise propagates to the members:
    # the error stays within a small multiple of the planted noise (the signal is ~1000x larger).
    assert error.mean() <= 2 * noise_level.mean(), (error, noise_level)
    assert torch.all(error <= 4 * noise_level), (error, noise_level)
    assert d.explained_variance(trajectory) > 0.999


def test_attributes_have_documented_shapes_and_types():
    trajectory, _, _ = planted(num_params=3000)
    d = decompose(trajectory, modes=10, samples=300)
    assert d.assignment.dtype == torch.long and d.assignment.shape == (3000,)
    assert int(d.assignment.min()) >= 0 and int(d.assignment.max()) < d.num_modes
    assert d.references.dtype == torch.long and d.references.shape == (d.num_modes,)
    assert d.profiles.shape == (d.num_modes, 20)
    assert d.a.shape == d.b.shape == (3000,)
    assert d.reconstruct().shape == (20, 3000)
    assert int(d.mode_sizes.sum()) == 3000
    # each reference belongs to its own mode and is reproduced exactly
    assert torch.equal(d.assignment[d.references], torch.arange(d.num_modes))
    torch.testing.assert_close(d.profiles, trajectory[:, d.references].T)
    torch.testing.assert_close(d.a[d.references], torch.ones(d.num_modes))


def test_fewer_modes_when_clustering_finds_fewer():
    # two distinct profiles only: asking for 10 modes may split, but never beyond the samples
    trajectory, _, _ = planted(num_params=500)
    d = decompose(trajectory, modes=10, samples=10)
    assert 1 <= d.num_modes <= 10


def test_online_updates_equal_batch_refit():
    trajectory, _, _ = planted(num_params=5000, snapshots=40)
    warmup = 12
    d = decompose(trajectory[:warmup], modes=4, samples=400)
    for snapshot in trajectory[warmup:]:
        d.update(snapshot)
    assert d.num_snapshots == 40
    torch.testing.assert_close(d.profiles, trajectory[:, d.references].T)
    a, b = batch_fit(trajectory, d)
    a_online, b_online = d.a.double().numpy(), d.b.double().numpy()
    assert np.linalg.norm(a_online - a) / np.linalg.norm(a) <= 1e-4
    assert np.linalg.norm(b_online - b) / np.linalg.norm(b) <= 1e-4


def test_batch_coefficients_are_least_squares():
    trajectory, _, _ = planted(num_params=4000, dtype=torch.float64)
    d = decompose(trajectory, modes=4, samples=400)
    a, b = batch_fit(trajectory, d)
    np.testing.assert_allclose(d.a.numpy(), a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.b.numpy(), b, rtol=1e-9, atol=1e-12)


def test_assignment_maximises_abs_correlation():
    trajectory, _, _ = planted(num_params=2000, dtype=torch.float64)
    d = decompose(trajectory, modes=4, samples=200)
    w = trajectory.numpy()
    corr = np.abs(np.corrcoef(w[:, d.references.numpy()].T, w.T)[: d.num_modes, d.num_modes :])
    np.testing.assert_array_equal(d.assignment.numpy(), corr.argmax(0))


def test_constant_columns_get_zero_slope_and_their_value():
    trajectory, _, _ = planted(num_params=1000, snapshots=25)
    trajectory[:, 10] = 0.37
    trajectory[:, 500:700] = torch.arange(200.0)
    d = decompose(trajectory[:20], modes=4, samples=1000)
    for snapshot in trajectory[20:]:
        d.update(snapshot)
    assert d.a[10] == 0 and d.b[10] == torch.tensor(0.37)
    assert torch.all(d.a[500:700] == 0) and torch.equal(d.b[500:700], torch.arange(200.0))
    assert not set(d.references.tolist()) & {10, *range(500, 700)}
    assert torch.isfinite(d.a).all() and torch.isfinite(d.b).all() and torch.isfinite(d.profiles).all()


def test_all_constant_trajectory_has_no_nan():
    trajectory = torch.arange(30.0).repeat(5, 1)
    d = decompose(trajectory, modes=3, samples=10)
    assert torch.all(d.a == 0)
    assert torch.equal(d.b, torch.arange(30.0))
    assert torch.equal(d.reconstruct(), trajectory)
    assert d.explained_variance(trajectory) == 1.0


def test_non_finite_values_name_the_first_bad_column():
    trajectory, _, _ = planted(num_params=300)
    trajectory[4, 123] = float("nan")
    trajectory[1, 200] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite value in column 123 \(snapshot 4\)"):
        decompose(trajectory, modes=4, samples=100)
    d = decompose(planted(num_params=300)[0], modes=4, samples=100)
    snapshot = torch.zeros(300)
    snapshot[77] = float("-inf")
    with pytest.raises(ValueError, match="non-finite value at parameter 77"):
        d.update(snapshot)
    assert d.num_snapshots == 20  # the failed update changed nothing


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(modes=0), ValueError, "modes must be an integer >= 1"),
        (dict(modes=2.5), TypeError, "modes must be an integer, got 2.5"),
        (dict(modes=5, samples=4), ValueError, r"samples must be >= modes \(5\), got 4"),
        (dict(seed=-1), ValueError, "seed must be an integer in"),
        (dict(seed="abc"), TypeError, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    trajectory, _, _ = planted(num_params=100)
    with pytest.raises(error, match=message):
        decompose(trajectory, **kwargs)


@pytest.mark.parametrize(
    "trajectory, message",
    [
        (torch.zeros(2, 10), "at least 3 snapshots"),
        (torch.zeros(10), "must be 2-D"),
        (torch.zeros(5, 10, dtype=torch.long), "floating-point"),
        (torch.zeros(5, 0), "no parameters"),
    ],
)
def test_bad_trajectories_are_rejected(trajectory, message):
    with pytest.raises(ValueError, match=message):
        decompose(trajectory)


def test_update_rejects_wrong_shape():
    d = decompose(planted(num_params=100)[0], modes=4, samples=50)
    with pytest.raises(ValueError, match=r"snapshot must have shape \(100,\)"):
        d.update(torch.zeros(99))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_accumulates_in_float32(dtype):
    trajectory, truth, _ = planted(num_params=5000)
    d = decompose(trajectory.to(dtype), modes=4, samples=500)
    assert d.a.dtype == d.b.dtype == d.profiles.dtype == torch.float32
    assert purity(d.assignment, truth, d.num_modes) >= 0.98
    assert d.relative_error(trajectory.to(dtype)).max() < 1e-2
    d.update(trajectory[-1].to(dtype))
    assert torch.isfinite(d.a).all()


def test_float64_stays_float64():
    d = decompose(planted(num_params=200, dtype=torch.float64)[0], modes=4, samples=100)
    assert d.a.dtype == torch.float64


def test_same_seed_same_result_other_seed_other_sample():
    trajectory, _, _ = planted(num_params=3000)
    first, second = (decompose(trajectory, modes=8, samples=200, seed=3) for _ in range(2))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.references, decompose(trajectory, modes=8, samples=200, seed=4).references)


def test_state_dict_round_trip_through_weights_only_load():
    trajectory, _, _ = planted(num_params=2000, snapshots=25)
    d = decompose(trajectory[:20], modes=4, samples=200)
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    restored = Decomposition.from_state_dict(torch.load(buffer, weights_only=True))
    for snapshot in trajectory[20:]:
        d.update(snapshot)
        restored.update(snapshot)
    assert torch.equal(d.a, restored.a) and torch.equal(d.b, restored.b)
    assert torch.equal(d.profiles, restored.profiles)


def test_from_state_dict_rejects_incomplete_state():
    state = decompose(planted(num_params=100)[0], modes=4, samples=50).state_dict()
    del state["comoment"]
    with pytest.raises(KeyError, match="comoment"):
        Decomposition.from_state_dict(state)


def test_layer_balanced_sampling_reaches_every_layer():
    sizes = [1_000_000, 10, 3, 50_000, 200]
    gen = torch.Generator().manual_seed(0)
    picked = sample_columns(sum(sizes), 1000, sizes, gen)
    assert picked.numel() == 1000 and picked.unique().numel() == 1000
    bounds = torch.tensor([0, *np.cumsum(sizes)])
    per_layer = torch.bucketize(picked, bounds[1:], right=True).bincount(minlength=len(sizes))
    assert per_layer.tolist()[1:3] == [10, 3]  # small layers are taken whole
    assert per_layer[0] > per_layer[3] > per_layer[4]
    assert per_layer[4] >= 100  # the even half reaches small layers (a plain uniform draw gives ~0)


def test_layer_sizes_must_sum_to_columns():
    with pytest.raises(ValueError, match="layer_sizes must be non-negative and sum to the number of columns"):
        decompose(planted(num_params=100)[0], modes=4, samples=50, layer_sizes=[50, 40])


def test_decompose_with_layer_sizes_recovers_modes():
    trajectory, truth, _ = planted(num_params=6000)
    d = decompose(trajectory, modes=4, samples=300, layer_sizes=[5000, 900, 100])
    assert purity(d.assignment, truth, d.num_modes) >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    trajectory, _, _ = planted(num_params=5000)
    cpu = decompose(trajectory, modes=4, samples=300)
    gpu = decompose(trajectory.cuda(), modes=4, samples=300)
    assert gpu.a.is_cuda
    assert torch.equal(cpu.assignment, gpu.assignment.cpu())
    torch.testing.assert_close(cpu.a, gpu.a.cpu(), rtol=1e-4, atol=1e-5)
    gpu.update(trajectory[-1].cuda())


@pytest.fixture(scope="module")
def digits_warmup():
    """A real warm-up: the digits MLP, SGD 0.05 / 0.9, 300 steps, a snapshot every 10 (31 x 85,002)."""
    from benchmarks import datasets
    from tests._helpers import mlp

    x, y, _, _ = datasets.digits(seed=0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snapshots = [torch.nn.utils.parameters_to_vector(model.parameters()).detach()]
    for step in range(300):
        index = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    return torch.stack(snapshots), [p.numel() for p in model.parameters()]


def test_more_modes_never_fit_a_real_warmup_worse(digits_warmup):
    """References that barely move (a dead unit's weight stepping by a few float32 rounding steps) once
    won the assignment of tens of thousands of columns: explained variance fell from 0.94 at 10 modes to
    -17 at 250, with columns fitted far worse than by their own mean."""
    trajectory, sizes = digits_warmup
    variance = (trajectory - trajectory.mean(0)).double().square().sum(0)
    explained = []
    for modes in (10, 30, 100, 250):
        d = decompose(trajectory, modes=modes, samples=1000, seed=0, layer_sizes=sizes)
        residual = (trajectory - d.reconstruct()).double().square().sum(0)
        assert int((residual > variance * (1 + 1e-3) + 1e-12).sum()) == 0, modes
        explained.append(d.explained_variance(trajectory))
    assert explained[0] > 0.9
    assert all(later >= earlier - 1e-3 for earlier, later in zip(explained, explained[1:])), explained


def test_barely_moving_columns_are_never_references():
    trajectory, _, _ = planted(num_params=2000)
    staircase = 1.0 + torch.arange(20.0)[:, None] * torch.finfo(torch.float32).eps * torch.ones(1, 500)
    trajectory[:, :500] = staircase  # monotone, so it correlates with every monotone profile
    d = decompose(trajectory, modes=4, samples=1000)
    assert int(d.references.min()) >= 500
    assert d.explained_variance(trajectory) > 0.999


def test_values_near_the_float32_limit_give_a_finite_fit_or_a_clear_error():
    t = torch.linspace(0, 1, 8)
    trajectory = torch.stack([t * 1e20, 2 * t * 1e20 + 1, t * t * 1e20], 1)
    with pytest.raises(ValueError, match="too large for torch.float32 statistics.*float64"):
        decompose(trajectory, modes=2, samples=3)
    d = decompose(trajectory.double(), modes=2, samples=3)
    assert torch.isfinite(d.a).all() and torch.isfinite(d.b).all()
    finite = decompose(trajectory / 1e15, modes=2, samples=3)  # large, but its squares fit in float32
    assert torch.isfinite(finite.a).all() and finite.explained_variance(trajectory / 1e15) > 0.9


def test_measure_gives_the_fit_quality_in_the_same_pass():
    trajectory, _, _ = planted(num_params=3000)
    d = decompose(trajectory, modes=4, samples=300, measure=True)
    torch.testing.assert_close(d.fit_quality.relative_error, d.relative_error(trajectory))
    assert d.fit_quality.explained_variance == pytest.approx(d.explained_variance(trajectory), rel=1e-6)
    assert decompose(trajectory, modes=4, samples=300).fit_quality is None
    large, _, _ = planted(num_params=400_000)  # 16 chunks: the error per snapshot is read on a sample of them
    d = decompose(large, modes=4, samples=300, measure=True)
    torch.testing.assert_close(d.fit_quality.relative_error, d.relative_error(large), rtol=0.05, atol=0)
    assert d.fit_quality.explained_variance == pytest.approx(d.explained_variance(large), rel=1e-5)
    d.update(large[-1])
    assert d.fit_quality is None  # it described the decomposed trajectory only


def test_from_state_dict_checks_index_ranges():
    state = decompose(planted(num_params=100)[0], modes=4, samples=50).state_dict()
    state["assignment"] = state["assignment"].clone()
    state["assignment"][3] = 99
    with pytest.raises(ValueError, match=r"'assignment' must hold integers in \[0, 4\)"):
        Decomposition.from_state_dict(state)


def test_a_transposed_trajectory_is_flagged():
    with pytest.warns(UserWarning, match="pass trajectory.T"):
        decompose(torch.randn(5000, 20), modes=2, samples=10)


def test_fit_slopes_gives_decompose_s_assignment_and_slopes_in_five_bytes(digits_warmup):
    from cmd_optim.core import fit_slopes

    trajectory, sizes = digits_warmup
    d = decompose(trajectory, modes=30, samples=1000, seed=0, layer_sizes=sizes, measure=True)
    fit = fit_slopes(trajectory, modes=30, samples=1000, seed=0, layer_sizes=sizes, measure=True)
    assert fit.assignment.dtype == torch.uint8 and fit.a.dtype == torch.float32
    assert torch.equal(fit.assignment.long(), d.assignment) and torch.equal(fit.references, d.references)
    torch.testing.assert_close(fit.a, d.a, rtol=1e-5, atol=1e-7)
    assert fit.fit_quality.explained_variance == d.fit_quality.explained_variance
    assert (fit.assignment.element_size() + fit.a.element_size()) == 5
