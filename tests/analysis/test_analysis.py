import json

import pytest
import torch

from cmd_optim import analysis, decompose
from cmd_optim.analysis.cli import main as cli
from tests._helpers import mlp, train


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, digits):
    """A short SGD run saved every 10 steps, as torch files and as Trainer-style safetensors folders."""
    safetensors = pytest.importorskip("safetensors.torch")
    root = tmp_path_factory.mktemp("run")
    (root / "pt").mkdir()
    (root / "hf").mkdir()
    model = mlp(hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snapshots = []

    def save(step):
        if step % 10:
            return
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, root / "pt" / f"step-{step}.pt")
        (root / "hf" / f"checkpoint-{step}").mkdir()
        safetensors.save_file(state, str(root / "hf" / f"checkpoint-{step}" / "model.safetensors"))
        snapshots.append(torch.cat([t.reshape(-1) for t in state.values()]))

    save(0)
    train(model, optimizer, digits, 120, on_step=save)
    return root, torch.stack(snapshots)


@pytest.mark.parametrize("layout", ["pt", "hf"])
def test_streamed_analysis_equals_the_in_memory_decomposition(recorded_run, layout, monkeypatch, tmp_path):
    root, trajectory = recorded_run
    reads = []
    original = analysis.CheckpointTrajectory.__getitem__
    monkeypatch.setattr(analysis.CheckpointTrajectory, "__getitem__",
                        lambda self, key: reads.append(original(self, key).shape[1]) or original(self, key))
    report = analysis.analyze(root / layout, tmp_path, modes=6, samples=300, progress=False,
                              chunk_elements=13 * 500)  # many chunks: the streamed path
    assert max(reads) < trajectory.shape[1] / 4  # never the whole trajectory at once
    # the same columns held in memory (a safetensors file lists its tensors in its own order)
    source = analysis.CheckpointTrajectory(analysis.find_checkpoints(root / layout))
    whole = original(source, (slice(None), slice(None)))
    if layout == "pt":
        assert torch.equal(whole, trajectory)
    trajectory = whole
    d = decompose(trajectory, modes=6, samples=300, layer_sizes=source.sizes)
    assert report.num_params == trajectory.shape[1] == sum(sum(c) for c in report.layers.values())
    assert report.mode_sizes == d.mode_sizes.tolist()
    assert report.relative_error == pytest.approx(d.relative_error(trajectory).tolist(), rel=1e-4, abs=1e-7)
    assert report.explained_variance == pytest.approx(d.explained_variance(trajectory), rel=1e-5)
    centered = trajectory.double() - trajectory.double().mean(0)
    singular = torch.linalg.svdvals(centered) ** 2
    assert report.pca_dims == report.num_modes and not report.pca_is_trivial
    expected = float(singular[:report.num_modes].sum() / singular.sum())
    assert report.pca_explained_variance == pytest.approx(expected, rel=1e-6)
    assert report.steps == list(range(0, 130, 10))
    assert report.plots == ["correlation.png", "profiles.png", "layers.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in report.plots)
    assert json.loads((tmp_path / "report.json").read_text())["num_modes"] == report.num_modes
    assert "Explained variance" in (tmp_path / "report.md").read_text()


def test_checkpoints_are_taken_in_step_order_and_errors_are_clear(tmp_path, recorded_run):
    root, _ = recorded_run
    names = [p.parent.name for p in analysis.find_checkpoints(root / "hf")]
    assert names == [f"checkpoint-{s}" for s in range(0, 130, 10)]  # 100 after 90, not after 10
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        analysis.find_checkpoints(tmp_path / "missing")
    (tmp_path / "few").mkdir()
    torch.save({"w": torch.zeros(3)}, tmp_path / "few" / "a-1.pt")
    with pytest.raises(ValueError, match=r"1 checkpoints \(Trainer checkpoint-\* folders or files ending in .*ckpt"):
        analysis.find_checkpoints(tmp_path / "few")


def test_command_line(recorded_run, tmp_path, capsys):
    root, _ = recorded_run
    cli(["analyze", str(root / "pt"), "--out", str(tmp_path), "--modes", "4", "--samples", "200", "--no-progress"])
    assert "explained variance CMD" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists()


@pytest.mark.parametrize("layout", ["nested", "lightning"])
def test_checkpoints_nested_in_a_dict_are_read(recorded_run, tmp_path, layout):
    """``torch.save({"model": sd, "optimizer": ...})`` (what examples/quickstart.py writes) and Lightning's
    ``epoch=E-step=S.ckpt`` with ``{"state_dict": ...}``."""
    root, trajectory = recorded_run
    for index, path in enumerate(analysis.find_checkpoints(root / "pt")):
        state = torch.load(path, weights_only=True)
        step = 10 * index
        if layout == "nested":
            torch.save({"model": state, "optimizer": {"lr": 0.1}, "step": step}, tmp_path / f"step_{step}.pt")
        else:
            torch.save({"state_dict": state, "epoch": index}, tmp_path / f"epoch={index}-step={step}.ckpt")
    report = analysis.analyze(tmp_path, tmp_path / "out", modes=4, samples=200, progress=False)
    assert report.num_params == trajectory.shape[1] and report.steps == list(range(0, 130, 10))


def test_a_file_without_a_state_dict_is_named(tmp_path):
    for step in range(3):
        torch.save({"notes": "no tensors here", "step": step}, tmp_path / f"s{step}.pt")
    with pytest.raises(ValueError, match="holds no state_dict .* under one of state_dict, model"):
        analysis.analyze(tmp_path, progress=False)


def test_pca_with_as_many_dimensions_as_checkpoints_is_flagged(recorded_run, tmp_path):
    root, _ = recorded_run
    for path in analysis.find_checkpoints(root / "pt")[:5]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.warns(UserWarning, match="reproduces them exactly"):
        report = analysis.analyze(tmp_path, tmp_path / "out", modes=10, samples=200, progress=False)
    assert report.pca_dims == 4 and report.pca_is_trivial
    assert "not a comparison" in (tmp_path / "out" / "report.md").read_text()


def test_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["analyze", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cmd-optim analyze: error: no such run folder") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0 and "cmd-optim 0." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["analyze", "--help"])
    assert "parameters the clustering sees" in capsys.readouterr().out


def test_online_cmd_built_from_checkpoints_equals_the_one_fitted_during_the_run(recorded_run, tmp_path):
    """The same snapshots, decomposed streamed from the files and refitted file by file, give the model that
    OnlineCMD fitted in memory."""
    from cmd_optim import OnlineCMD

    root, trajectory = recorded_run
    model = mlp(hidden=32)
    live = OnlineCMD(model, modes=4, warmup_snapshots=6, samples=300)
    for row in trajectory:
        torch.nn.utils.vector_to_parameters(row, model.parameters())
        live.update_parameters(model)
    built = analysis.online_cmd_from_checkpoints(mlp(hidden=32), root / "pt", warmup_snapshots=6, modes=4,
                                                 samples=300)
    assert built.snapshots_seen == live.snapshots_seen == len(trajectory)
    assert torch.equal(built.decomposition.assignment, live.decomposition.assignment)
    for p, q in zip(built.module.parameters(), live.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
