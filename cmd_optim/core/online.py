"""Online CMD as a weight-averaging model: the paper's headline method, used like SWA or EMA.

``OnlineCMD`` holds a copy of a model (``.module``, as ``torch.optim.swa_utils.AveragedModel`` does) and is
fed a snapshot of the training model at a time. Until ``warmup_snapshots`` snapshots the copy follows
the latest snapshot while the snapshots are kept; at that snapshot they are decomposed; from then on every
snapshot refits ``a, b`` over every snapshot seen (``Decomposition.update``: running sums, no trajectory)
and the copy's parameters are ``a * r + b`` at the references' current values. Evaluating the copy is
what the paper reports above plain SGD (its Table 1).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from ._checks import check_device, check_dtype, check_int
from .decomposition import Decomposition, decompose
from .layout import FlatLayout
from .snapshots import SnapshotBuffer, open_saved

__all__ = ["OnlineCMD"]


class OnlineCMD(nn.Module):
    """The CMD model of a training run, fitted online beside it.

    Args:
        model: the module being trained; a deep copy is held in ``self.module``.
        modes, samples, seed: as for :func:`~cmd_optim.decompose` (M, K, the sampling seed).
        warmup_snapshots: snapshots kept before the decomposition (the paper's F, at least 3).
        params: ``fnmatch`` patterns of the parameter names that take part (default: every floating-point
            parameter); the others, and every buffer (BatchNorm statistics), are copied from the model.
        snapshot_dtype, snapshot_device: how the warm-up snapshots are kept (``warmup_snapshots * N *
            itemsize`` bytes, freed at the decomposition).
        snapshot_dir: a folder: the warm-up snapshots go to a file there instead of memory.
        device: where the decomposition and its running fit live (default: ``snapshot_device``): 24 bytes
            per parameter, plus M numbers per snapshot seen.

    ``update_parameters(model)`` takes one snapshot. ``decomposition`` is None until the warm-up
    snapshots were seen. ``state_dict()`` holds the copy's parameters and buffers and, as extra state,
    the snapshots or the running fit: tensors and plain values only.
    """

    def __init__(self, model: nn.Module, modes: int = 10, warmup_snapshots: int = 20, samples: int = 1000,
                 seed: int = 0, params: str | Iterable[str] | None = None,
                 snapshot_dtype: torch.dtype = torch.float32, snapshot_device: torch.device | str = "cpu",
                 device: torch.device | str | None = None, snapshot_dir: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.modes = check_int("modes", modes, low=1)
        self.samples = check_int("samples", samples, low=1)
        if self.samples < self.modes:
            raise ValueError(f"samples must be >= modes ({self.modes}), got {self.samples}")
        self.warmup_snapshots = check_int("warmup_snapshots", warmup_snapshots, low=3)
        self.seed = check_int("seed", seed, low=0, high=2**63 - 1)
        self.snapshot_dtype = check_dtype("snapshot_dtype", snapshot_dtype)
        self.snapshot_device = check_device("snapshot_device", snapshot_device)
        self.fit_device = self.snapshot_device if device is None else check_device("device", device)
        self.snapshot_dir = snapshot_dir
        self.module = copy.deepcopy(model)
        self.names = _taking_part(self.module, params)
        held = dict(self.module.named_parameters())
        self._held = [held[name] for name in self.names]
        self.layout = FlatLayout(self._held)
        self.snapshots_seen = 0
        self.decomposition: Decomposition | None = None
        self._buffer: SnapshotBuffer | None = self._new_buffer()

    def _new_buffer(self) -> SnapshotBuffer:
        return SnapshotBuffer(self._held, self.warmup_snapshots, self.snapshot_device, self.snapshot_dtype,
                              self.snapshot_dir)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Take one snapshot of ``model`` (the module being trained, with the same parameter names and shapes).
        A snapshot that is refused (a non-finite value, another shape) leaves OnlineCMD as it was."""
        source = dict(model.named_parameters())
        missing = [name for name in self.names if name not in source]
        if missing:
            raise ValueError(f"model has no parameter {missing[0]!r}: pass the module OnlineCMD was built from")
        self._check_shapes({name: source[name].shape for name in self.names}, "model's")
        self.observe(self.layout.flatten([source[name] for name in self.names]))
        self._copy_the_rest(model)

    @torch.no_grad()
    def observe(self, flat: torch.Tensor) -> None:
        """Take one snapshot given as the (N,) vector of the taking-part parameters, in ``names`` order."""
        if flat.shape != (self.layout.numel,):
            raise ValueError(f"flat must have shape ({self.layout.numel},), got {tuple(flat.shape)}")
        if not bool(torch.isfinite(flat).all()):
            index = torch.nonzero(~torch.isfinite(flat))[0]
            name = self.names[self.layout.locate(index)[0][0]]
            raise ValueError(f"the snapshot has a non-finite value in parameter {name!r}; it was not taken")
        flat = flat.to(self.fit_device)
        if self.decomposition is None:
            self._buffer.record(self.layout.split(flat))
            self.snapshots_seen += 1
            if self.snapshots_seen < self.warmup_snapshots:
                self._place(flat)
                return
            trajectory = self._buffer.trajectory()
            if isinstance(trajectory, torch.Tensor):
                trajectory = trajectory.to(self.fit_device)
            d = decompose(trajectory, modes=self.modes, samples=self.samples, seed=self.seed,
                          layer_sizes=self.layout.sizes)
            self.decomposition = _on(self.fit_device, d)
            self._buffer.release()
            self._buffer = None  # the snapshots are freed here
        else:
            self.decomposition.update(flat)
            self.snapshots_seen += 1
        d = self.decomposition
        self._place(d.evaluate(flat[d.references]))

    @torch.no_grad()
    def start_from(self, decomposition: Decomposition, latest: torch.Tensor) -> None:
        """Take over a decomposition of the first ``decomposition.num_snapshots`` snapshots (fitted
        elsewhere, e.g. streamed from checkpoint files); ``latest`` (N,) is the last of them."""
        if decomposition.num_params != self.layout.numel:
            raise ValueError(f"the decomposition covers {decomposition.num_params} parameters, this model "
                             f"{self.layout.numel}")
        decomposition = _on(self.fit_device, decomposition)
        self.decomposition = decomposition
        self._buffer = None
        self.snapshots_seen = decomposition.num_snapshots
        latest = latest.to(self.fit_device)
        self._place(decomposition.evaluate(latest[decomposition.references]))

    def _check_shapes(self, shapes: dict, whose: str) -> None:
        """Refuse ``shapes`` (name -> shape of taking-part parameters) where one differs from the held parameter."""
        for name, p in zip(self.names, self._held):
            if name in shapes and tuple(shapes[name]) != tuple(p.shape):
                raise ValueError(f"{whose} parameter {name!r} has shape {tuple(shapes[name])}, OnlineCMD holds "
                                 f"{tuple(p.shape)}")

    def _place(self, flat: torch.Tensor) -> None:
        for p, piece in zip(self._held, self.layout.split(flat)):
            p.copy_(piece.view(p.shape))

    def _copy_the_rest(self, model: nn.Module) -> None:
        """Buffers, and the parameters that do not take part, follow the model."""
        taking_part = set(self.names)
        held = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            if name not in taking_part and name in held:
                held[name].copy_(p)
        own = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if name in own:
                own[name].copy_(b)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # shapes are checked before anything is loaded (torch refuses them only after loading the rest)
        keys = {name: f"{prefix}module.{name}" for name in self.names}
        self._check_shapes({name: state_dict[key].shape for name, key in keys.items()
                            if isinstance(state_dict.get(key), torch.Tensor)}, "the state's")
        extra = state_dict.get(f"{prefix}_extra_state")
        saved = extra.get("settings") if isinstance(extra, dict) else None
        if saved is not None and saved != self._settings():  # (states of earlier versions carry none)
            differ = ", ".join(f"{key}={saved.get(key)!r} (this OnlineCMD: {value!r})"
                               for key, value in self._settings().items() if saved.get(key) != value)
            raise ValueError(f"the OnlineCMD state was saved with other settings: {differ}")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _settings(self) -> dict:
        """The settings a saved state depends on."""
        return {"modes": self.modes, "warmup_snapshots": self.warmup_snapshots, "samples": self.samples,
                "seed": self.seed}

    def get_extra_state(self) -> dict:
        state = {"snapshots_seen": self.snapshots_seen, "names": list(self.names), "settings": self._settings()}
        if self.decomposition is not None:
            state["decomposition"] = self.decomposition.state_dict()
        else:
            state["snapshots"] = self._buffer.saved()
        return state

    def set_extra_state(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError("the OnlineCMD state was saved for other parameters (names differ)")
        seen = int(state["snapshots_seen"])
        if "decomposition" in state:
            d = _on(self.fit_device, Decomposition.from_state_dict(state["decomposition"]))
            if d.num_params != self.layout.numel:
                raise ValueError(f"the OnlineCMD state decomposes {d.num_params} parameters, this one has "
                                 f"{self.layout.numel}")
            self.decomposition, self._buffer = d, None
        else:
            buffer = self._new_buffer()
            buffer.load(open_saved(state["snapshots"]))
            if buffer.count != seen:
                raise ValueError(f"the OnlineCMD state holds {buffer.count} snapshots but counts {seen}")
            self.decomposition, self._buffer = None, buffer
        self.snapshots_seen = seen

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the warm-up snapshots (0 after the decomposition)."""
        return self._buffer.nbytes if self._buffer is not None else 0


def _on(device: torch.device, d: Decomposition) -> Decomposition:
    """``d`` with its tensors on ``device`` (``d`` itself if they are there)."""
    if d.a.device == device:
        return d
    return Decomposition.from_state_dict({key: value.to(device) for key, value in d.state_dict().items()})


def _taking_part(module: nn.Module, patterns) -> list[str]:
    names = [name for name, p in module.named_parameters() if p.is_floating_point()]
    if patterns is None:
        chosen = names
    else:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"params pattern {pattern!r} matches no parameter name (names look like {names[0]!r})")
    if not chosen:
        raise ValueError("OnlineCMD has no floating-point parameter to model")
    return chosen
