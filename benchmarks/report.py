"""Writing one benchmark's section into docs/benchmarks.md, leaving the other sections alone."""
from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    """One line naming the CPU/GPU the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def save_figure(fig, name: str) -> str:
    """Lay out ``fig``, save it as docs/img/NAME (110 dpi), close it; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    images = DOC.parent / "img"
    images.mkdir(parents=True, exist_ok=True)
    fig.savefig(images / name, dpi=110)
    plt.close(fig)
    return name


def write_json(path: Path, payload) -> None:
    """``payload`` as indented JSON at ``path``, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``."""
    block = f"<!-- begin {name} -->\n{body.strip()}\n<!-- end {name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def comparison_table(rows: list[dict]) -> str:
    """Rows with ``method, accuracy, dims, seconds, state_bytes`` as an aligned text table."""
    width = max(14, *(len(r["method"]) for r in rows))
    lines = [f"{'method':<{width}} {'test acc':>8} {'trainable numbers':>18} {'time (s)':>9} {'optimizer state':>16}"]
    for r in rows:
        state = r["state_bytes"] / 1024
        unit = "KiB" if state < 10 * 1024 else "MiB"
        lines.append(f"{r['method']:<{width}} {r['accuracy']:>8.3f} {r['dims']:>18,} {r['seconds']:>9.2f} "
                     f"{state if unit == 'KiB' else state / 1024:>12.1f} {unit}")
    return "\n".join(lines)


def add_output_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The options of a benchmark that keeps its records in a JSON and its table in one doc section:
    ``--json`` (default ``results``), ``--report`` and ``--no-write``."""
    parser.add_argument("--json", type=Path, default=results)
    parser.add_argument("--report", action="store_true", help="only rewrite the doc section from the JSON")
    parser.add_argument("--no-write", action="store_true", help="print the table; write no JSON or doc")
