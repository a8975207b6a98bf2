"""OnlineCMD: the CMD model of a run, fitted online beside it (the paper's evaluated model)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from cmd_optim import OnlineCMD
from tests._helpers import batch_index, mlp, roundtrip, same_weights
from tests.core.test_decompose import planted, purity


def _module_of(vector):
    module = nn.Linear(vector.numel(), 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(vector.view(1, -1))
    return module


def test_planted_modes_are_recovered_through_update_parameters():
    trajectory, truth, _ = planted(num_params=4000, snapshots=30)
    model = _module_of(trajectory[0])
    cmd = OnlineCMD(model, modes=4, warmup_snapshots=12, samples=400)
    for t, row in enumerate(trajectory):
        with torch.no_grad():
            model.weight.copy_(row.view(1, -1))
        cmd.update_parameters(model)
        if t < 11:
            assert cmd.decomposition is None
            assert torch.equal(cmd.module.weight, model.weight)  # the copy follows the latest snapshot
    d = cmd.decomposition
    assert d.num_modes == 4 and purity(d.assignment, truth, 4) >= 0.99 and d.num_snapshots == 30
    torch.testing.assert_close(cmd.module.weight.view(-1), d.evaluate(trajectory[-1][d.references]))
    torch.testing.assert_close(cmd(torch.ones(4000)), cmd.module(torch.ones(4000)))


@pytest.fixture(scope="module")
def sgd_run(digits):
    """A real run: digits MLP, SGD at a constant rate, a snapshot every 10 steps (40 snapshots)."""
    model = mlp(hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cmd = OnlineCMD(model, modes=6, warmup_snapshots=15, samples=500)
    snapshots = []
    x, y = digits[0], digits[1]
    for step in range(400):
        index = batch_index(step, len(x), 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            cmd.update_parameters(model)
            snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    return model, cmd, torch.stack(snapshots)


def test_the_held_model_is_the_batch_least_squares_cmd_model(sgd_run):
    _, cmd, trajectory = sgd_run
    d = cmd.decomposition
    w = trajectory.double().numpy()
    r = w[:, d.references.numpy()][:, d.assignment.numpy()]
    rc, wc = r - r.mean(0), w - w.mean(0)
    var = (rc**2).sum(0)
    a = np.where(var > 0, (rc * wc).sum(0) / np.where(var > 0, var, 1), 0)
    b = w.mean(0) - a * r.mean(0)
    batch_model = torch.from_numpy(a * w[-1, d.references.numpy()][d.assignment.numpy()] + b).float()
    held = torch.nn.utils.parameters_to_vector(cmd.module.parameters()).detach()
    torch.testing.assert_close(held, batch_model, atol=1e-5, rtol=1e-5)


def test_state_does_not_grow_beyond_the_profiles(sgd_run, digits):
    model, cmd, _ = sgd_run
    sizes = []
    for _ in range(2):
        sizes.append(sum(t.numel() * t.element_size() for t in cmd.get_extra_state()["decomposition"].values()))
        for _ in range(10):
            cmd.update_parameters(model)
    assert sizes[1] - sizes[0] == 10 * cmd.decomposition.num_modes * 4 and cmd.snapshot_bytes == 0


@pytest.mark.parametrize("stop", [8, 25])  # in the warm-up, and after the decomposition
def test_resume_from_the_state_dict_is_exact(digits, stop):
    def run(until, cmd=None, model=None, start=0):
        model = model or mlp(hidden=16)
        cmd = cmd or OnlineCMD(model, modes=4, warmup_snapshots=10, samples=200)
        for snap in range(start, until):
            with torch.no_grad():  # a deterministic stand-in for training between snapshots
                for k, p in enumerate(model.parameters()):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * snap + k)) * 0.01)
            cmd.update_parameters(model)
        return model, cmd

    model, whole = run(40)
    first_model, first = run(stop)
    saved_model, saved = roundtrip(first_model.state_dict()), roundtrip(first.state_dict())
    resumed_model = mlp(hidden=16)
    resumed_model.load_state_dict(saved_model)
    resumed = OnlineCMD(resumed_model, modes=4, warmup_snapshots=10, samples=200)
    resumed.load_state_dict(saved)
    run(40, resumed, resumed_model, start=stop)
    for p, q in zip(whole.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)


def _same_state(a, b):
    """Two state_dicts, the OnlineCMD's extra state included, hold the same values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[key], b[key]) for key in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _train_a_little(model, snap):
    with torch.no_grad():  # a deterministic stand-in for training between snapshots
        for k, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * snap + k)) * 0.01)


@pytest.mark.parametrize("when, value, dtype, error, message", [
    (1, float("nan"), torch.float32, ValueError, "non-finite value in parameter '2.weight'; it was not taken"),
    (5, float("inf"), torch.float32, ValueError, "non-finite value in parameter '2.weight'"),  # decomposed by then
    (1, 7e4, torch.float16, OverflowError, "beyond snapshot_dtype=torch.float16's range"),
], ids=["nan-in-the-warm-up", "inf-after-the-decomposition", "beyond-float16"])
def test_a_refused_snapshot_leaves_online_cmd_as_it_was(when, value, dtype, error, message):
    model = mlp(hidden=8)
    cmd, clean = (OnlineCMD(model, modes=2, warmup_snapshots=4, samples=50, snapshot_dtype=dtype) for _ in range(2))
    for snap in range(8):
        _train_a_little(model, snap)
        if snap == when:
            bad = copy.deepcopy(model)
            with torch.no_grad():
                bad[2].weight[0, 0] = value
            before = roundtrip(cmd.state_dict())
            with pytest.raises(error, match=message):
                cmd.update_parameters(bad)
            assert _same_state(roundtrip(cmd.state_dict()), before)
        cmd.update_parameters(model)
        clean.update_parameters(model)
    assert cmd.snapshots_seen == 8 and same_weights(cmd.module, clean.module)


def test_parameters_of_other_shapes_are_refused_naming_both_shapes():
    model = mlp(hidden=8)
    cmd = OnlineCMD(model, modes=2, warmup_snapshots=4, samples=50)
    transposed = copy.deepcopy(model)  # as many elements in every parameter, (64, 8) where OnlineCMD holds (8, 64)
    transposed[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous())
    for other, shape in [(transposed, r"\(64, 8\)"), (mlp(hidden=12), r"\(12, 64\)")]:
        message = rf"model's parameter '0.weight' has shape {shape}, OnlineCMD holds \(8, 64\)"
        with pytest.raises(ValueError, match=message):
            cmd.update_parameters(other)
    assert cmd.snapshots_seen == 0
    cmd.update_parameters(model)
    saved = OnlineCMD(transposed, modes=2, warmup_snapshots=4, samples=50)
    for _ in range(2):
        saved.update_parameters(transposed)
    before = roundtrip(cmd.state_dict())
    with pytest.raises(ValueError, match=r"the state's parameter '0.weight' has shape \(64, 8\), OnlineCMD holds"):
        cmd.load_state_dict(saved.state_dict())
    assert _same_state(roundtrip(cmd.state_dict()), before)  # nothing loaded before the refusal


def test_buffers_follow_the_model_and_update_bn_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    cmd = OnlineCMD(model, modes=2, warmup_snapshots=4, samples=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(64, 6)
    for _ in range(8):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
        cmd.update_parameters(model)
    assert torch.equal(cmd.module[1].running_mean, model[1].running_mean)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
    update_bn(loader, cmd)
    with torch.no_grad():
        expected = cmd.module[0](data).mean(0)
    torch.testing.assert_close(cmd.module[1].running_mean, expected)


def test_only_the_named_parameters_take_part():
    model = mlp(hidden=8)
    cmd = OnlineCMD(model, modes=2, warmup_snapshots=3, samples=20, params=["0.*", "2.*"])
    assert cmd.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        cmd.update_parameters(model)
    assert torch.equal(cmd.module[4].weight, model[4].weight)  # copied, not modelled
    assert cmd.decomposition.num_params == 8 * 64 + 8 + 8 * 8 + 8
    with pytest.raises(ValueError, match="params pattern 'head.*' matches no parameter name"):
        OnlineCMD(model, params="head.*")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(warmup_snapshots=2), ValueError, "warmup_snapshots must be an integer >= 3"),
    (dict(modes=5, samples=4), ValueError, r"samples must be >= modes \(5\)"),
    (dict(snapshot_dtype=torch.int32), ValueError, "snapshot_dtype must be a floating-point dtype"),
    (dict(device="meta"), ValueError, "device must hold real data"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        OnlineCMD(mlp(hidden=4), **kwargs)


def test_half_precision_snapshots():
    trajectory, truth, _ = planted(num_params=3000, snapshots=20)
    model = _module_of(trajectory[0])
    cmd = OnlineCMD(model, modes=4, warmup_snapshots=10, samples=300, snapshot_dtype=torch.float16)
    assert cmd.snapshot_bytes == 10 * 3000 * 2
    for row in trajectory:
        with torch.no_grad():
            model.weight.copy_(row.view(1, -1))
        cmd.update_parameters(model)
    assert purity(cmd.decomposition.assignment, truth, 4) >= 0.98 and cmd.snapshot_bytes == 0


def test_snapshots_in_a_file_give_the_same_model_and_resume(tmp_path):
    trajectory, _, _ = planted(num_params=3000, snapshots=20)
    models = {}
    for where in ("memory", "file"):
        model = _module_of(trajectory[0])
        cmd = OnlineCMD(model, modes=4, warmup_snapshots=10, samples=300,
                        snapshot_dir=str(tmp_path) if where == "file" else None)
        for t, row in enumerate(trajectory):
            with torch.no_grad():
                model.weight.copy_(row.view(1, -1))
            cmd.update_parameters(model)
            if where == "file" and t == 5:
                assert cmd.snapshot_bytes == 0 and len(list(tmp_path.iterdir())) == 1
                saved = roundtrip(cmd.state_dict())  # names a lasting link to the rows so far
                again = OnlineCMD(_module_of(row), modes=4, warmup_snapshots=10, samples=300,
                                  snapshot_dir=str(tmp_path))
                again.load_state_dict(saved)
                assert again.snapshots_seen == 6
                del again  # its own file goes with it
        models[where] = cmd
    assert torch.equal(models["memory"].module.weight, models["file"].module.weight)
    assert not [p for p in tmp_path.iterdir() if "-rows" not in p.name]  # the working files are gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fit_on_another_device_gives_the_same_held_model(sgd_run):
    """``device=``: the decomposition and its running fit on the GPU, the model and snapshots on the CPU."""
    _, cpu_cmd, trajectory = sgd_run
    gpu_cmd = OnlineCMD(mlp(hidden=32), modes=6, warmup_snapshots=15, samples=500, device="cuda")
    for row in trajectory:
        gpu_cmd.observe(row)  # the same snapshots the CPU one took
    assert gpu_cmd.decomposition.a.is_cuda
    assert torch.equal(gpu_cmd.decomposition.assignment.cpu(), cpu_cmd.decomposition.assignment)
    held = [p.detach() for p in gpu_cmd.module.parameters()]
    assert all(not p.is_cuda for p in held)
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in held]),
                               torch.nn.utils.parameters_to_vector(cpu_cmd.module.parameters()).detach(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("other", [dict(warmup_snapshots=4), dict(modes=3)])
def test_c4_a_state_saved_with_other_settings_is_refused_before_anything_loads(other):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    settings = dict(modes=2, warmup_snapshots=5, samples=50)
    saved = OnlineCMD(model, **settings)
    for _ in range(6):  # past the decomposition
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        saved.update_parameters(model)
    target = OnlineCMD(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), **{**settings, **other})
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    key = next(iter(other))
    with pytest.raises(ValueError, match=rf"other settings: {key}="):
        target.load_state_dict(saved.state_dict())
    after = target.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()) and target.snapshots_seen == 0
