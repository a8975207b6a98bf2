"""The warm-up: the base optimizer trains every parameter, and the reduction's recorder (if any) watches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ._params import tensor_bytes
from .phase import Setup, guarded_step

__all__ = ["WarmupPhase", "WarmupRecorder", "load_base_state"]


class WarmupRecorder(ABC):
    """What a reduction records during the warm-up (e.g. snapshots); the warm-up calls it after each step."""

    @abstractmethod
    def records_at(self, steps_taken: int) -> bool:
        """Whether :meth:`after_step` records anything after step ``steps_taken`` (the warm-up then keeps an
        undo point, so that a recording that fails leaves the optimizer as it was before the step)."""
        return False

    def after_step(self, steps_taken: int) -> None:  # noqa: B027 (optional: a recorder may record nothing)
        """Record what step ``steps_taken`` (1-based) left behind; must leave the recorder as it was on error."""

    @abstractmethod
    def state(self) -> dict:
        """What a warm-up state_dict keeps of the recording: tensors and plain values only."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the recording holds now."""

    def release(self) -> None:  # noqa: B027 (an optional hook)
        """Free what the recording holds (called after the switch, or when a loaded one is dropped)."""


class WarmupPhase:
    """Ordinary training with the base optimizer, exactly as it would run alone.

    ``recorder`` is what the reduction records of the warm-up (the CMD reductions: a snapshot at step 0 and
    every ``snapshot_every`` steps); None for a reduction that needs nothing from it. ``saw_gradient`` says
    whether any step so far had a gradient (a warm-up without one has nothing to switch from).
    """

    name = "warmup"
    reduced = False

    def __init__(self, setup: Setup, optimizer: torch.optim.Optimizer | None = None,
                 recorder: WarmupRecorder | None = None, saw_gradient: bool = False) -> None:
        self.setup = setup
        self.saw_gradient = saw_gradient
        if optimizer is None:
            optimizer = setup.base_on_copies()
            setup.adopt_groups(optimizer)
        self.optimizer = optimizer
        self.recorder = recorder

    def step(self, loss, closure: Callable | None) -> bool:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.setup.all_finite(p.grad for p in params):
            return False
        taken = guarded_step(self.optimizer, loss, closure, params)
        self.saw_gradient = self.saw_gradient or (taken and any(p.grad is not None for p in params))
        return taken

    @torch.no_grad()
    def undo_point(self, steps_taken: int) -> Callable[[], None] | None:
        """Before step ``steps_taken``: a function that puts the weights and the base's state back as they are
        now, if the recorder records after that step (None otherwise: nothing after it can fail)."""
        if self.recorder is None or not self.recorder.records_at(steps_taken):
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        weights = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                 for p, entry in self.optimizer.state.items()}
        saw_gradient = self.saw_gradient

        @torch.no_grad()
        def undo() -> None:
            for p, weight in zip(params, weights):
                p.copy_(weight)
            self.optimizer.state.clear()
            self.optimizer.state.update(state)
            self.saw_gradient = saw_gradient

        return undo

    def after_step(self, steps_taken: int) -> None:
        if self.recorder is not None:
            self.recorder.after_step(steps_taken)

    def trainable_dims(self) -> int:
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad)

    def state_bytes(self) -> int:
        return tensor_bytes(self.optimizer.state) + (self.recorder.nbytes if self.recorder is not None else 0)

    def extra_state(self) -> dict:
        return {"saw_gradient": self.saw_gradient, **({} if self.recorder is None else self.recorder.state())}

    def report(self) -> dict:
        return {}

    @classmethod
    def load(cls, setup: Setup, envelope: dict, extra: dict, recorder_for: Callable) -> WarmupPhase:
        """A warm-up phase from saved state, built beside the live one: nothing live is touched.
        ``recorder_for(saved)`` restores the reduction's recorder from ``extra`` (or returns None)."""
        recorder = recorder_for(extra)
        try:
            optimizer = setup.base_on_copies()
            load_base_state(optimizer, envelope)
        except Exception:
            if recorder is not None:
                recorder.release()
            raise
        saw = extra.get("saw_gradient", True)
        if not isinstance(saw, bool):
            raise ValueError(f"the warm-up state_dict's 'saw_gradient' must be True or False, got {saw!r}")
        return cls(setup, optimizer, recorder, saw)

    def adopt(self) -> None:
        """Called once this phase replaces the live one: step on the visible group dicts."""
        self.setup.adopt_groups(self.optimizer)

    def release(self) -> None:
        """Called when this phase is replaced: the recording is freed."""
        if self.recorder is not None:
            self.recorder.release()


def load_base_state(optimizer: torch.optim.Optimizer, envelope: dict) -> None:
    """``optimizer.load_state_dict(envelope)``, after checking that per-parameter state tensors have their
    parameter's shape (torch checks only the counts)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = envelope.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("the state_dict's 'state' is not a dict")
    for index, entry in state.items():
        if isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict):
            p = params[index]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim == p.ndim and value.ndim and value.shape != p.shape:
                    raise ValueError(f"the state_dict's {key!r} of parameter {index} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(p.shape)}: it belongs to another model")
    optimizer.load_state_dict(envelope)
