"""What a reduction is: the declared interface every reduced phase's strategy implements, and the registry.

A reduction decides what happens after the switch. It declares what it needs from the warm-up and what it
supports (read by :class:`~cmd_optim.optim.cmd.CMDOptimizer` to choose the default and to refuse what cannot
run, and by the contract tests to build their matrix), takes its own settings (the top-level shortcuts of
``CMDOptimizer`` configure them), and builds its phase. Adding a reduction is one module with a
``@register`` class, imported by ``cmd_optim/optim/__init__.py``; ``cmd.py`` names none.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

from .phase import Phase, Setup
from .warmup import WarmupPhase, WarmupRecorder

__all__ = ["DEFAULT_ORDER", "REDUCTIONS", "Reduction", "choose_default", "register", "resolve", "users_of"]


class Reduction(ABC):
    """A reduced-phase strategy. Subclasses are dataclasses of their settings, validated in ``__post_init__``.

    Capabilities (class attributes, read before anything is built):
        name: the ``reduction=`` string and the state_dict's tag.
        needs_snapshots: the warm-up records snapshots of the tracked parameters for it.
        supports_sharding: it runs on FSDP2 row shards.
        supports_lbfgs: it runs with LBFGS as the base (a single parameter group, a line search).
        communication_hook: ``cmd_optim.integrations.ddp.register_cmd_hook`` exchanges its reduced gradient.
        shortcuts: the top-level ``CMDOptimizer`` arguments that configure it (fields of the dataclass).
        state_keys: the entries of its phase's state inside ``state_dict()["cmd"]["phase_state"]``.
        state_settings: the settings a saved state depends on (saved beside it; a load with others is refused).
    """

    name: ClassVar[str]
    needs_snapshots: ClassVar[bool] = False
    supports_sharding: ClassVar[bool] = False
    supports_lbfgs: ClassVar[bool] = False
    communication_hook: ClassVar[bool] = False
    shortcuts: ClassVar[tuple[str, ...]] = ()
    state_keys: ClassVar[tuple[str, ...]] = ()
    state_settings: ClassVar[tuple[str, ...]] = ()

    def _set(self, name: str, value) -> None:
        """Store a validated (normalised) setting on the frozen dataclass, in ``__post_init__``."""
        object.__setattr__(self, name, value)

    def refusal(self, base_name: str, sharded: bool) -> str | None:
        """Why this reduction cannot run with that base and sharding (None: it can)."""
        if base_name == "LBFGS" and not self.supports_lbfgs:
            return f"reduction={self.name!r} cannot run with LBFGS (it takes a single parameter group)"
        if sharded and not self.supports_sharding:
            return f"reduction={self.name!r} is not available with FSDP2-sharded parameters"
        return None

    def check(self, setup: Setup) -> None:  # noqa: B027 (an optional hook)
        """Refuse, at construction, a setting this reduction cannot serve (after the capability checks)."""

    def warmup_recorder(self, setup: Setup, saved: dict | None = None) -> WarmupRecorder | None:
        """A new recorder for the warm-up, or one restored from a warm-up state (``saved``); None: nothing."""
        return None

    @abstractmethod
    def build(self, setup: Setup, warmup: WarmupPhase, steps_taken: int) -> Phase:
        """The reduced phase at the switch, from the warm-up (its optimizer state and its recording)."""

    @abstractmethod
    def load(self, setup: Setup, envelope: dict, state: dict) -> Phase:
        """The reduced phase from a saved ``state`` (every entry checked before anything live changes)."""

    def settings(self) -> dict:
        """The reduction's settings as plain values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


#: name -> class, filled by :func:`register` as the reduction modules are imported.
REDUCTIONS: dict[str, type[Reduction]] = {}
#: the default reduction is the first of these that can run with the base and the sharding.
DEFAULT_ORDER = ("lowrank", "modes")


def register(cls: type[Reduction]) -> type[Reduction]:
    """Class decorator: make ``cls`` available as ``reduction=cls.name``."""
    if cls.name in REDUCTIONS and REDUCTIONS[cls.name] is not cls:
        raise ValueError(f"a reduction named {cls.name!r} is registered already")
    REDUCTIONS[cls.name] = cls
    return cls


def users_of(argument: str) -> list[str]:
    """The registered reductions that take ``argument`` as a top-level shortcut (the paper's first)."""
    users = [name for name, cls in REDUCTIONS.items() if argument in cls.shortcuts]
    return sorted(users, key=lambda name: (name != "modes", name))


def _refuse_unused(cls: type[Reduction], shortcuts: dict) -> None:
    unused = [key for key in shortcuts if key not in cls.shortcuts]
    if unused:
        key = unused[0]
        users = users_of(key)
        where = f"reduction {' and '.join(repr(u) for u in users)}" if users else "no reduction"
        raise TypeError(f"{key}= is used by {where}, not by reduction={cls.name!r}: drop it, or choose a reduction "
                        "that uses it")


def resolve(reduction, shortcuts: dict) -> Reduction | None:
    """The reduction from ``reduction=`` (None, a registered name or an instance) and the top-level shortcuts
    the user passed (only those given). None: the default, chosen (and given the shortcuts) by
    :func:`choose_default` once the base and sharding are known."""
    if isinstance(reduction, Reduction):
        cls = type(reduction)
        _refuse_unused(cls, shortcuts)
        defaults = {f.name: f.default for f in dataclasses.fields(reduction)}
        for key, value in shortcuts.items():
            own = getattr(reduction, key)
            if own != defaults[key] and own != value:
                raise TypeError(f"{key}={value!r} contradicts reduction={reduction!r}: set it in one place")
        return dataclasses.replace(reduction, **shortcuts) if shortcuts else reduction
    if reduction is None:
        if "modes" in shortcuts:  # the design card's line: modes= asks for the paper's mode reduction
            return REDUCTIONS["modes"](**shortcuts)
        return None  # the default: choose_default gives it the shortcuts once the base is known
    if isinstance(reduction, str) and reduction in REDUCTIONS:
        cls = REDUCTIONS[reduction]
        _refuse_unused(cls, shortcuts)
        return cls(**shortcuts)
    raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)} or an instance of their classes, "
                     f"got {reduction!r}")


def choose_default(base_name: str, sharded: bool, shortcuts: dict | None = None) -> Reduction:
    """The first reduction of :data:`DEFAULT_ORDER` that can run with this base and sharding, configured by
    ``shortcuts``; a shortcut it does not take is refused, naming the reductions that do."""
    shortcuts = shortcuts or {}
    for name in DEFAULT_ORDER:
        cls = REDUCTIONS[name]
        if cls().refusal(base_name, sharded) is None:
            unused = [key for key in shortcuts if key not in cls.shortcuts]
            if unused:
                users = users_of(unused[0])
                raise TypeError(f"{unused[0]}= is used by reduction {' and '.join(repr(u) for u in users)}, not by "
                                f"the default reduction here ({name!r}): pass reduction={users[0]!r} as well, or "
                                "drop it")
            return cls(**shortcuts)
    raise ValueError(f"no reduction can run with base {base_name} (sharded: {sharded})")
