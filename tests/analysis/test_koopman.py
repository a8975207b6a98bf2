import numpy as np
import pytest
import torch

pytest.importorskip("pydmd")
from cmd_optim.analysis.koopman import delay_embedding, eigenvalue_distance, koopman_eigenvalues, seed_spread  # noqa: E402


def linear_run(eigenvalues, steps=120, seed=0):
    """x_{t+1} = A x_t with A's eigenvalues given (a rotation block for a complex pair), observed through a
    random linear map into 5 dimensions."""
    rng = np.random.default_rng(seed)
    blocks = []
    for lam in eigenvalues:
        if np.iscomplex(lam):
            blocks.append(abs(lam) * np.array([[np.cos(np.angle(lam)), -np.sin(np.angle(lam))],
                                               [np.sin(np.angle(lam)), np.cos(np.angle(lam))]]))
        else:
            blocks.append(np.array([[lam.real]]))
    size = sum(len(b) for b in blocks)
    a = np.zeros((size, size))
    offset = 0
    for b in blocks:
        a[offset:offset + len(b), offset:offset + len(b)] = b
        offset += len(b)
    x = rng.normal(size=size)
    states = []
    for _ in range(steps):
        states.append(x)
        x = a @ x
    return np.array(states) @ rng.normal(size=(size, 5))


def test_dmd_recovers_planted_eigenvalues_and_distance_sees_them():
    planted = [0.95 * np.exp(0.3j), 0.95 * np.exp(-0.3j), 0.8]
    found = koopman_eigenvalues(linear_run([0.95 * np.exp(0.3j), 0.8]), delays=2, rank=3)
    assert eigenvalue_distance(found, planted) < 1e-6
    other = koopman_eigenvalues(linear_run([0.95 * np.exp(0.3j), 0.8], seed=1), delays=2, rank=3)
    assert eigenvalue_distance(found, other) < 1e-6  # another initial condition, the same dynamics
    slower = koopman_eigenvalues(linear_run([0.9 * np.exp(0.1j), 0.5]), delays=2, rank=3)
    assert eigenvalue_distance(found, slower) > 0.1


def test_distance_is_a_matching_not_a_sorting():
    assert eigenvalue_distance([1, 2j], [2j, 1]) == 0
    assert eigenvalue_distance([0, 1], [0, 3]) == pytest.approx(1.0)  # (0 + 2) / 2
    assert eigenvalue_distance([0, 10], [0]) == 0  # different sizes: matched on the smaller set


def test_delay_embedding_shapes_and_errors():
    series = torch.arange(10.0).reshape(5, 2)
    embedded = delay_embedding(series, 3)
    assert embedded.shape == (3, 6) and embedded[1].tolist() == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="delays must be in"):
        delay_embedding(series, 5)
    with pytest.raises(ValueError, match="non-finite"):
        delay_embedding(torch.tensor([1.0, float("nan"), 2.0]), 1)


# Redman et al.'s check: online mirror descent with the log-barrier mirror map phi(x) = -sum log x on the
# loss sum_i tan(x_i) is conjugate, through u = grad phi(x) = -1/x, to online gradient descent in u on
# F(u) = sum_i integral of sec^2(-1/u); the entropic mirror map gives a different (non-conjugate) dynamics.
ETA, STEPS = 0.05, 200


def omd_log_barrier(x0):
    x, out = x0.copy(), []
    for _ in range(STEPS):
        out.append(x.copy())
        x = 1.0 / (1.0 / x + ETA / np.cos(x) ** 2)
    return np.array(out)


def ogd_conjugate(x0):
    u, out = -1.0 / x0, []
    for _ in range(STEPS):
        out.append(u.copy())
        u = u - ETA / np.cos(-1.0 / u) ** 2
    return np.array(out)


def omd_entropic(x0):
    x, out = x0.copy(), []
    for _ in range(STEPS):
        out.append(x.copy())
        x = x * np.exp(-ETA / np.cos(x) ** 2)
    return np.array(out)


def test_online_mirror_descent_and_its_conjugate_gradient_descent_are_identified():
    starts = [np.random.default_rng(seed).uniform(0.3, 1.3, 5) for seed in range(6)]
    omd = [koopman_eigenvalues(omd_log_barrier(x0)) for x0 in starts]
    ogd = [koopman_eigenvalues(ogd_conjugate(x0)) for x0 in starts]
    entropic = [koopman_eigenvalues(omd_entropic(x0)) for x0 in starts]
    spread = seed_spread(omd)
    equivalent = np.mean([eigenvalue_distance(a, b) for a, b in zip(omd, ogd)])
    different = np.mean([eigenvalue_distance(a, b) for a, b in zip(omd, entropic)])
    # the conjugate pair sits at the seed-to-seed level; the other mirror map far beyond it
    assert equivalent < 3 * spread and different > 3 * spread
    assert different > 5 * equivalent
