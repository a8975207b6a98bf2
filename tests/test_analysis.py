import json

import pytest
import torch
from conftest import mlp, train

from cmd_optim import analysis, decompose, decomposition
from cmd_optim.__main__ import main as cli


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
    monkeypatch.setattr(decomposition, "CHUNK_ELEMENTS", 13 * 500)  # many chunks: the streamed path
    reads = []
    original = analysis.CheckpointTrajectory.__getitem__
    monkeypatch.setattr(analysis.CheckpointTrajectory, "__getitem__",
                        lambda self, key: reads.append(original(self, key).shape[1]) or original(self, key))
    report = analysis.analyze(root / layout, tmp_path, modes=6, samples=300, progress=False)
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
    assert report.pca_explained_variance == pytest.approx(float(singular[:report.num_modes].sum() / singular.sum()), rel=1e-6)
    assert [p.name for p in map(lambda s: tmp_path / s, report.plots)] == ["correlation.png", "profiles.png", "layers.png"]
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
    with pytest.raises(ValueError, match="1 checkpoints; CMD needs at least 3"):
        analysis.find_checkpoints(tmp_path / "few")


def test_command_line(recorded_run, tmp_path, capsys):
    root, _ = recorded_run
    cli(["analyze", str(root / "pt"), "--out", str(tmp_path), "--modes", "4", "--samples", "200"])
    assert "explained variance CMD" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists()
