"""The mode map's kernels, by backend: fused C on the CPU, Triton on a GPU, stock PyTorch everywhere.

:func:`backend` names what a device gets: ``"native"`` (the C extension built at install, OpenMP
threads), ``"triton"`` (on CUDA devices, when Triton is installed), or ``"torch"`` (packed blocks and
interleaved histogram lanes in stock PyTorch ops, :mod:`cmd_optim.core.kernels.packed`). Setting the
environment variable ``CMD_OPTIM_KERNELS=torch`` forces the stock path. Every backend computes what
``ModeMap.mode_sums_reference`` and ``ModeMap.lift_reference`` compute; the tests hold each to them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import packed

__all__ = ["available", "backend", "cpu", "gpu", "packed"]

try:
    from . import _native
except ImportError:  # not built: no compiler at install, or an unusual platform
    _native = None
cpu = importlib.import_module(f"{__name__}.cpu") if _native is not None else None


def __getattr__(name: str):
    if name == "gpu":  # imported when first used: it needs Triton
        return importlib.import_module(f"{__name__}.gpu")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> dict[str, bool]:
    """Which backends this installation has."""
    return {"native": _native is not None, "triton": _triton_available(), "torch": True}


def backend(device: torch.device | str = "cpu") -> str:
    """The backend the mode map uses on ``device``."""
    if os.environ.get("CMD_OPTIM_KERNELS", "") == "torch":
        return "torch"
    device = torch.device(device)
    if device.type == "cpu" and _native is not None:
        return "native"
    if device.type == "cuda" and _triton_available():
        return "triton"
    return "torch"
