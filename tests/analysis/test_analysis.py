import argparse
import json
from pathlib import Path

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


def test_command_line(recorded_run, tmp_path, capsys, monkeypatch):
    """``analyze`` on torch files reads each one once (its step and its tensors from one torch.load)."""
    root, _ = recorded_run
    loads = []
    load = analysis.checkpoints._torch_load
    monkeypatch.setattr(analysis.checkpoints, "_torch_load", lambda path: loads.append(path.name) or load(path))
    cli(["analyze", str(root / "pt"), "--out", str(tmp_path), "--modes", "4", "--samples", "200", "--no-progress"])
    assert "explained variance CMD" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists()
    assert sorted(loads) == sorted(p.name for p in (root / "pt").glob("*.pt")) and len(loads) == 13


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


def _lightning_folder(root, folder, recorded):
    """The run as Lightning's ModelCheckpoint(save_last=True) writes it: a file per step, ``last.ckpt`` (the last
    weights again) and a ``-v1`` copy; the steps in the names, or (``recorded``) in ``global_step`` only, the names
    giving the epoch and a loss (``filename="{epoch}-{val_loss:.2f}"``)."""
    folder.mkdir()
    paths = analysis.find_checkpoints(root / "pt")
    for index, path in enumerate(paths):
        state = {"state_dict": torch.load(path, weights_only=True), "epoch": index}
        if recorded:
            state["global_step"] = 10 * index
            name = f"epoch={index}-val_loss={1 / (index + 1):.2f}"
        else:
            name = f"epoch={index}-step={10 * index}"
        torch.save(state, folder / f"{name}.ckpt")
        if index == 5:
            torch.save(state, folder / f"{name}-v1.ckpt")
    torch.save(state, folder / "last.ckpt")
    return paths


@pytest.mark.parametrize("recorded", [False, True])
def test_lightning_last_and_v1_copies_are_skipped_with_a_warning(recorded_run, tmp_path, recorded):
    """E4: last.ckpt and epoch=5-...-v1.ckpt were read as steps -1 and 1 (first); the step recorded or in the name
    orders the files, and the two copies are skipped, named in a warning and in the report."""
    root, trajectory = recorded_run
    _lightning_folder(root, tmp_path / "run", recorded)
    with pytest.warns(UserWarning, match=r"skipped .*last\.ckpt") as caught:
        report = analysis.analyze(tmp_path / "run", tmp_path / "out", modes=4, samples=200, progress=False)
    message = str(caught[0].message)
    v1 = "epoch=5-val_loss=0.17-v1.ckpt" if recorded else "epoch=5-step=50-v1.ckpt"
    assert v1 in message and "step 50, already epoch=5-" in message
    assert report.steps == list(range(0, 130, 10)) and report.num_params == trajectory.shape[1]
    assert sorted(Path(p).name for p in report.skipped) == [v1, "last.ckpt"]
    assert all("-v1" not in Path(p).name and "last" not in Path(p).name for p in report.checkpoints)
    assert "last.ckpt" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == report.skipped


def test_online_cmd_from_a_lightning_folder_skips_last_ckpt(recorded_run, tmp_path):
    """E4: with last.ckpt read first, the held model was 0.04 away from the one fitted on the step files."""
    root, _ = recorded_run
    _lightning_folder(root, tmp_path / "run", recorded=False)
    kwargs = {"warmup_snapshots": 6, "modes": 4, "samples": 300}
    with pytest.warns(UserWarning, match=r"skipped last\.ckpt .*epoch=5-step=50-v1\.ckpt"):
        built = analysis.online_cmd_from_checkpoints(mlp(hidden=32), tmp_path / "run", **kwargs)
    plain = analysis.online_cmd_from_checkpoints(mlp(hidden=32), root / "pt", **kwargs)
    assert built.snapshots_seen == plain.snapshots_seen
    for p, q in zip(built.module.parameters(), plain.module.parameters()):
        assert torch.equal(p, q)


def test_checkpoints_whose_step_cannot_be_told_are_named(tmp_path):
    """E4: first.pt, second.pt, ... were taken in directory order, silently."""
    for name in ["first", "second", "third", "fourth"]:
        torch.save({"w": torch.zeros(3)}, tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match=r"0 checkpoints .*; skipped first\.pt, fourth\.pt, second\.pt, third\.pt "
                                         r"\(no step recorded or in the name\)"):
        analysis.find_checkpoints(tmp_path)


def _damage(folder, case):
    """Four good checkpoints, the last one damaged as ``case`` says; the damaged file's path."""
    safetensors = pytest.importorskip("safetensors.torch")
    suffix = ".safetensors" if case == "truncated-safetensors" else ".pt"
    for step in range(4):
        state = {"w": torch.full((64, 8), float(step)), "b": torch.zeros(8)}
        if suffix == ".safetensors":
            safetensors.save_file(state, str(folder / f"step-{step}{suffix}"))
        elif case == "pickled" and step == 3:
            torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, folder / f"step-{step}{suffix}")
        else:
            torch.save(state, folder / f"step-{step}{suffix}")
    bad = folder / f"step-3{suffix}"
    if case == "random-bytes":
        bad.write_bytes(torch.randint(0, 256, (4000,), dtype=torch.uint8).numpy().tobytes())
    elif case.startswith("truncated"):
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


@pytest.mark.parametrize("case", ["random-bytes", "truncated-pt", "truncated-safetensors", "pickled"])
def test_an_unreadable_checkpoint_is_a_one_line_error_naming_it(tmp_path, capsys, case):
    """E7: these were 20-27-line tracebacks from torch or safetensors that did not name the file."""
    bad = _damage(tmp_path, case)
    with pytest.raises(SystemExit) as exit_info:
        cli(["analyze", str(tmp_path), "--no-progress", "--modes", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"cmd-optim analyze: error: cannot read {bad}")
    if case == "pickled":
        assert "weights_only=True" in err and "argparse.Namespace" in err
    else:
        assert "corrupt or truncated" in err


def test_an_unwritable_report_folder_is_a_one_line_error_naming_it(recorded_run, tmp_path, capsys):
    """E7: a read-only --out was a traceback (the tests run as root, so --out lies under a file instead)."""
    root, _ = recorded_run
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "report"
    with pytest.raises(SystemExit) as exit_info:
        cli(["analyze", str(root / "pt"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"cmd-optim analyze: error: cannot create the report folder {out}: Not a directory")


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
