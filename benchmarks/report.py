"""Writing one benchmark's section into docs/benchmarks.md, leaving the other sections alone."""
from __future__ import annotations

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


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``."""
    block = f"<!-- begin {name} -->\n{body.strip()}\n<!-- end {name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
