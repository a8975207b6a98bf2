"""The plots and wording of ``cmd-optim analyze``'s report (D9 of the newcomer trial)."""

import re
import struct
import sys
from pathlib import Path

import pytest
import torch

from cmd_optim import analysis
from cmd_optim.analysis.cli import main as cli

pytest.importorskip("matplotlib")


def _run(folder, layers=6, checkpoints=8, motion=1.0, offset=0.0, name="epoch-{}.pt"):
    """A run of ``layers`` 16-value tensors moving noisily from ``offset``, saved as ``name.format(1, 2, ...)``."""
    g = torch.Generator().manual_seed(0)
    start = {f"block{i}.weight": torch.randn(16, generator=g) + offset for i in range(layers)}
    for t in range(checkpoints):
        path = folder / name.format(t + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v + motion * t * torch.rand(16, generator=g) for k, v in start.items()}, path)
    return folder


def _analyze(folder, modes=4):
    return analysis.analyze(folder, folder / "out", modes=modes, samples=300, progress=False)


@pytest.fixture
def saved(monkeypatch):
    """The figures the report saves, by file name, laid out as saved."""
    from matplotlib.figure import Figure

    figures = {}
    savefig = Figure.savefig

    def record(fig, fname, *args, **kwargs):
        savefig(fig, fname, *args, **kwargs)
        figures[Path(fname).name] = fig

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _drawn(fig):
    """The renderer of ``fig`` drawn anew (on an Agg canvas: closing it left a bare one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def _inside(inner, outer, slack=1.0):
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack and inner.x1 <= outer.x1 + slack
            and inner.y1 <= outer.y1 + slack)


def test_titles_lie_inside_their_figures_clear_of_other_axes(tmp_path, saved):
    """correlation.png's title was cut off on the left and its end hidden by the colorbar."""
    _analyze(_run(tmp_path))
    assert sorted(saved) == ["correlation.png", "layers.png", "profiles.png"]
    for name, fig in saved.items():
        renderer = _drawn(fig)
        for ax in fig.axes:
            if not ax.get_title():
                continue
            title = ax.title.get_window_extent(renderer)
            assert _inside(title, fig.bbox), (name, ax.get_title())
            for other in fig.axes:
                if other is not ax:
                    assert not title.overlaps(other.get_window_extent(renderer)), (name, ax.get_title())


@pytest.mark.parametrize("layers, modes", [(6, 4), (2, 20)])
def test_the_layers_legend_covers_no_bar(tmp_path, saved, layers, modes):
    """layers.png's legend sat over the last layer's bar."""
    assert _analyze(_run(tmp_path, layers=layers, checkpoints=24), modes=modes).num_modes == modes
    fig = saved["layers.png"]
    renderer = _drawn(fig)
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    assert _inside(legend, fig.bbox)
    assert ax.patches and not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)


def test_the_layers_plot_stays_readable_with_many_layers(tmp_path):
    """For MiniLM, layers.png was 770 x 3685 px with 100+ tiny labels."""
    report = _analyze(_run(tmp_path, layers=150))
    width, height = struct.unpack(">II", (tmp_path / "out" / "layers.png").read_bytes()[16:24])
    assert height <= 2000 and width <= 2000
    assert len(report.layers) == 150  # report.md still lists every layer
    assert "block149.weight" in (tmp_path / "out" / "report.md").read_text()


def test_the_profiles_axis_says_what_it_holds(tmp_path, saved):
    """profiles.png said "training step" for the numbers in ``epoch-N.pt``; report.md said "steps 1 to 8"."""
    report = _analyze(_run(tmp_path / "epochs"))
    label = saved["profiles.png"].axes[-1].get_xlabel()
    assert "step" not in label and "name" in label
    assert not report.steps_known and report.steps == list(range(1, 9))
    assert "numbered 1 to 8 by their names" in (tmp_path / "epochs" / "out" / "report.md").read_text()
    report = _analyze(_run(tmp_path / "trainer", name="checkpoint-{}0/pytorch_model.bin"))
    assert report.steps_known and report.steps == list(range(10, 90, 10))
    assert saved["profiles.png"].axes[-1].get_xlabel() == "training step"
    assert "steps 10 to 80" in (tmp_path / "trainer" / "out" / "report.md").read_text()


def test_small_relative_errors_are_printed_with_their_digits(tmp_path):
    """A fine-tune (large weights, small motion) had its relative errors printed as 0.0000 0.0000 ..."""
    report = _analyze(_run(tmp_path, motion=1e-4, offset=10.0))
    assert 0 < max(report.relative_error) < 1e-4
    line = re.search(r"Relative reconstruction error per checkpoint: (.*)",
                     (tmp_path / "out" / "report.md").read_text()).group(1)
    printed = [float(value) for value in line.split()]
    assert printed == pytest.approx(report.relative_error, rel=5e-3)


def test_missing_matplotlib_is_said_with_the_extra_to_install(tmp_path, monkeypatch, capsys):
    """Without matplotlib, neither analyze() nor the command line said that no plots were written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    _run(tmp_path)
    with pytest.warns(UserWarning, match=r"no plots written: matplotlib is not installed \(pip install "
                                         r"'cmd-optim\[plot\]'\)"):
        report = _analyze(tmp_path)
    assert report.plots == [] and not list((tmp_path / "out").glob("*.png"))
    assert "pip install 'cmd-optim[plot]'" in (tmp_path / "out" / "report.md").read_text()
    cli(["analyze", str(tmp_path), "--out", str(tmp_path / "cli"), "--modes", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert "cmd-optim analyze: warning: no plots written: matplotlib is not installed" in err
