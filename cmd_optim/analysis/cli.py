"""The command line: ``cmd-optim analyze RUN_DIR`` (also ``python -m cmd_optim``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib import metadata
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    try:
        __version__ = metadata.version("cmd-optim")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        __version__ = "unknown"
    parser = argparse.ArgumentParser(prog="cmd-optim", description="Correlation Mode Decomposition of training runs.")
    parser.add_argument("--version", action="version", version=f"cmd-optim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    analyze = commands.add_parser(
        "analyze", help="CMD of a run's checkpoints, with a report and plots",
        description="CMD of the checkpoints in RUN_DIR (Trainer checkpoint-* folders, or .safetensors/.pt/.pth/"
                    ".bin/.ckpt files, ordered by the step each records or its name gives; others are skipped with a "
                    "warning): writes report.md, report.json and PNG plots (with matplotlib: pip install "
                    "'cmd-optim[plot]').")
    analyze.add_argument("run_dir", metavar="RUN_DIR", help="folder of the run's checkpoints")
    analyze.add_argument("--out", help="report folder (default RUN_DIR/cmd-analysis)")
    analyze.add_argument("--modes", type=int, default=10, help="the most CMD modes to find (default 10)")
    analyze.add_argument("--samples", type=int, default=1000,
                         help="parameters the clustering sees (default 1000)")
    analyze.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from .report import analyze

    with warnings.catch_warnings():  # warnings as one line each, like errors
        warnings.showwarning = lambda message, *_: print(f"cmd-optim analyze: warning: {message}", file=sys.stderr)
        try:
            report = analyze(args.run_dir, args.out, args.modes, args.samples, args.seed,
                             progress=not args.no_progress)
        except (OSError, ValueError, TypeError) as error:
            print(f"cmd-optim analyze: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    out = Path(args.out) if args.out else Path(args.run_dir) / "cmd-analysis"
    pca = f"PCA ({report.pca_dims} dims) {report.pca_explained_variance:.4f}"
    print(f"{len(report.checkpoints)} checkpoints, {report.num_params:,} parameters, {report.num_modes} modes; "
          f"explained variance CMD {report.explained_variance:.4f}, {pca}"
          f"{' (exact with this few checkpoints)' if report.pca_is_trivial else ''}; report in {out}")
