"""Argument checks shared by every layer: each error names the argument and what it got."""

from __future__ import annotations

import math
import numbers
import operator

import torch

__all__ = ["check_device", "check_dtype", "check_int", "check_real"]


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (numpy integers too, bools not) within ``[low, high]``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {number}")
    return number


def check_real(name: str, value, low: float | None = None, high: float | None = None, *,
               low_open: bool = False) -> float:
    """``value`` as a finite float (bools not) within ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    if not math.isfinite(number) or below or (high is not None and number > high):
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {left}{low}, {high}], got {value!r}")
    return number


def check_dtype(name: str, value) -> torch.dtype:
    """A floating-point ``torch.dtype``."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.float16, got {value!r}")
    if not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype, got {value}")
    return value


def check_device(name: str, value) -> torch.device:
    """A ``torch.device`` that exists on this machine and holds real data (not ``meta``)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={value!r} is not a device: {error}") from None
    if device.type == "meta":
        raise ValueError(f"{name} must hold real data, got the meta device")
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", lambda: False)
        if not available() or (device.index is not None and device.index >= module.device_count()):
            raise ValueError(f"{name}={value!r}: no such device on this machine")
    return device
