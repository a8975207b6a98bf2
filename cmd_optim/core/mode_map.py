"""The reduced map of CMD training: every mapped parameter moves only along its mode.

Parameter ``i`` of mode ``m`` in parameter group ``g`` moves as ``w_i += u_i * delta[g, m]``: one *mode
coefficient* per (group, mode) (``num_coefficients = G * M``), and per parameter a *slope* ``u_i``, its CMD
slope ``a_i`` divided by the root-mean-square slope of its mode (so a unit move of a coefficient moves
a typical member by one unit, as one step of a coordinate-wise optimizer would), clipped to
``[-max_slope, max_slope]`` (members of a reference that barely moves would otherwise get slopes in the
thousands). The two directions of the map, in GaLore's words ``project`` and ``project_back``:

- :meth:`ModeMap.project`: a full gradient (one tensor per parameter) to mode gradients
  ``sum_i u_i g_i / sum_i u_i^2`` over each coefficient's members, the least-squares projection of the
  full step onto the coefficient's direction;
- :meth:`ModeMap.lift_`: coefficient changes back to parameter moves.

Each has a readable ``*_reference`` implementation beside the fast ones (``cmd_optim.core.kernels``),
and the tests hold the fast path to it. Per parameter the map stores 5 bytes: the float32 slope and a
uint8 histogram bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernels
from ._checks import check_int, check_real
from .decomposition import Decomposition, SlopeFit
from .kernels import packed as _packed

__all__ = ["KERNELS", "MAX_SLOPE", "ModeMap"]

#: The ``kernel`` choices of a mode map.
KERNELS = ("auto", "native", "triton", "torch", "reference")

#: Largest |u| (slopes relative to their mode's RMS slope) a parameter may keep.
MAX_SLOPE = 10.0


class ModeMap:
    """Slopes and modes of the mapped parameters, and the two directions of the map.

    Args:
        slopes: one float32 tensor per mapped parameter, shaped like it (``u``).
        modes: one integer tensor per mapped parameter, shaped like it, values in ``[0, num_modes)``.
        groups: the parameter-group index of each mapped parameter.
        num_modes: M, at most 256 (a parameter's mode is stored in one byte).
        num_groups: G.
        mode_rms: (M,) the RMS of each mode's CMD slopes ``a`` (the unit of ``u``), kept for the speed limit.
        kernel: ``"auto"`` (the backend :func:`cmd_optim.core.kernels.backend` names for the device: the C
            extension on the CPU, Triton on a GPU, else stock PyTorch), ``"native"``, ``"triton"``,
            ``"torch"`` (packed blocks and interleaved lanes in stock PyTorch ops) or ``"reference"`` (the
            readable per-parameter formulas).
        layout: knobs of the packed layout (``chunk``, ``pack_below``, ``lanes``).
    """

    def __init__(self, slopes: Sequence[torch.Tensor], modes: Sequence[torch.Tensor], groups: Sequence[int],
                 num_modes: int, num_groups: int, mode_rms: torch.Tensor | None = None, *, kernel: str = "auto",
                 **layout) -> None:
        slopes, modes = list(slopes), list(modes)
        if len(slopes) != len(modes):
            raise ValueError(f"slopes and modes need one entry per parameter, got {len(slopes)} and {len(modes)}")
        device = slopes[0].device if slopes else torch.device("cpu")
        flat_slopes = torch.cat([u.reshape(-1).to(device, torch.float32) for u in slopes]) if slopes else torch.zeros(0)
        flat_modes = torch.cat([m.reshape(-1).to(device, torch.uint8) for m in modes]) if modes else torch.zeros(0)
        self._build(flat_slopes, flat_modes, [tuple(u.shape) for u in slopes], [u.device for u in slopes], groups,
                    num_modes, num_groups, mode_rms, kernel, layout)

    def _build(self, flat_slopes, flat_modes, shapes, devices, groups, num_modes, num_groups, mode_rms, kernel,
               layout, reduce=None) -> None:
        num_modes = check_int("num_modes", num_modes, low=1)
        if num_modes > 256:
            raise ValueError(f"a mode map holds at most 256 modes (one byte per parameter), got {num_modes}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        groups = [int(g) for g in groups]
        if len(groups) != len(shapes):
            raise ValueError(f"groups need one entry per parameter, got {len(groups)} for {len(shapes)}")
        if any(g < 0 or g >= num_groups for g in groups):
            raise ValueError(f"group indices must be in [0, {num_groups})")
        self.num_modes, self.num_groups, self.groups = num_modes, num_groups, groups
        self.device = devices[0] if devices else torch.device("cpu")
        self.kernel = kernels.backend(self.device) if kernel == "auto" else kernel
        if self.kernel == "native" and kernels.cpu is None:
            raise ValueError("kernel='native' needs cmd-optim's C extension, which this installation lacks")
        self._packed = _packed.PackedBlocks(flat_slopes, flat_modes, shapes, groups, devices, num_modes, **layout)
        self.slopes: list[torch.Tensor] = self._packed.slopes
        # Squared norm of each coefficient's direction (sum of u^2 over its members, the map's own sums with
        # u for the gradient): dividing by it makes a mode step the least-squares projection of the full step.
        norms = _packed.mode_sums(self._packed, self.slopes, num_groups)
        if reduce is not None:  # the map of one shard: its coefficients' directions span every shard
            reduce([norms])
        self.active = norms > 0
        self.direction_norms = norms.float().clamp_min(torch.finfo(torch.float32).tiny)
        rms = torch.ones(num_modes) if mode_rms is None else mode_rms
        self.mode_rms = rms.to(self.device, torch.float32)

    @classmethod
    def from_fit(cls, fit: SlopeFit, params: Sequence[torch.Tensor], groups: Sequence[int], num_groups: int,
                 max_slope: float = MAX_SLOPE, kernel: str = "auto", reduce=None, **layout) -> ModeMap:
        """The map of a fit of the concatenated ``params`` (its columns, in order). It takes over the fit's
        buffers, turning slopes into normalised slopes and modes into bins in place: the map costs no memory
        beyond the fit's 5 bytes per parameter. For the fit of one shard of a sharded trajectory,
        ``reduce(tensors)`` adds tensors over the shards in place (the RMS slopes and the directions' norms
        are the whole's)."""
        max_slope = check_real("max_slope", max_slope, low=0, low_open=True)
        if sum(p.numel() for p in params) != fit.num_params:
            raise ValueError(f"the parameters hold {sum(p.numel() for p in params)} elements, the fit "
                             f"{fit.num_params}")
        if fit.assignment.dtype != torch.uint8:
            raise ValueError(f"a mode map holds at most 256 modes (one byte per parameter), got {fit.num_modes}")
        a, mode = fit.a, fit.assignment
        sums = torch.zeros(fit.num_modes, dtype=torch.float64, device=a.device)
        counts = torch.zeros(fit.num_modes, dtype=torch.float64, device=a.device)
        pieces = range(0, len(a), _packed.CHUNK)
        for start in pieces:  # a chunk at a time: no temporary of N elements
            index = mode[start:start + _packed.CHUNK].long()
            sums.index_add_(0, index, a[start:start + _packed.CHUNK].double().square())
            counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        if reduce is not None:
            reduce([sums, counts])
        rms = (sums / counts.clamp_min(1)).sqrt().float()
        unit = torch.where(rms > 0, rms, 1)
        for start in pieces:
            piece = a[start:start + _packed.CHUNK]
            piece.div_(unit[mode[start:start + _packed.CHUNK].long()]).clamp_(-max_slope, max_slope)
        mapped = cls.__new__(cls)
        mapped._build(a, mode, [tuple(p.shape) for p in params], [p.device for p in params], groups, fit.num_modes,
                      num_groups, rms, kernel, layout, reduce)
        return mapped

    @classmethod
    def from_decomposition(cls, d: Decomposition, params: Sequence[torch.Tensor], groups: Sequence[int],
                           num_groups: int, max_slope: float = MAX_SLOPE, **kwargs) -> ModeMap:
        """The map of a Decomposition of the concatenated ``params`` (its columns, in order; ``d`` is left as
        it was)."""
        return cls.from_fit(d.slope_fit(), params, groups, num_groups, max_slope, **kwargs)

    @property
    def num_coefficients(self) -> int:
        """C = G * M: coefficient ``g * M + m`` moves the members of mode m in group g."""
        return self.num_groups * self.num_modes

    @property
    def modes(self) -> list[torch.Tensor]:
        """The mode of every mapped parameter (uint8 tensors shaped like them)."""
        return self._packed.modes()

    def group_slices(self) -> list[slice]:
        """The coefficients of each parameter group, as slices of a (C,) vector."""
        return [slice(g * self.num_modes, (g + 1) * self.num_modes) for g in range(self.num_groups)]

    def mode_of_coefficient(self) -> torch.Tensor:
        """(C,) long: the mode each coefficient belongs to."""
        return torch.arange(self.num_coefficients, device=self.device) % self.num_modes

    def _coefficient_indices(self) -> list[torch.Tensor]:
        """(numel,) long per parameter: the coefficient each element moves with."""
        return [m.reshape(-1).long() + group * self.num_modes for m, group in zip(self.modes, self.groups)]

    # ------------------------------------------------------------------ the two directions
    @torch.no_grad()
    def project(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Mode gradients (C,) float32: ``sum_i u_i g_i / sum_i u_i^2`` per coefficient."""
        return self.from_sums(self.mode_sums(grads))

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Mode gradients (C,) from their numerators (:meth:`mode_sums`, summed over parts or ranks)."""
        return sums.to(self.device).float() / self.direction_norms

    @torch.no_grad()
    def mode_sums(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The numerators of :meth:`project`, (C,) float64: ``sum_i u_i g_i``.

        ``grads`` lists one tensor (or None, counted as zero) per mapped parameter. The sums are linear
        in the gradients, so sums over parts of the parameters (a DDP bucket) or over ranks add up.
        """
        self._check_count(grads)
        if self.kernel == "reference":
            return self.mode_sums_reference(grads)
        if self.kernel == "native" and kernels.cpu.supports(grads):
            return kernels.cpu.mode_sums(self._packed, grads, self.num_groups)
        if self.kernel == "triton":
            return kernels.gpu.mode_sums(self._packed, grads, self.num_groups)
        return _packed.mode_sums(self._packed, grads, self.num_groups)

    @torch.no_grad()
    def lift_(self, params: Sequence[torch.Tensor | None], delta: torch.Tensor) -> None:
        """Move each parameter (None: left alone) by ``u * delta[coefficient]``; ``delta`` is (C,)."""
        self._check_count(params)
        delta = delta.reshape(-1)
        if self.kernel == "reference":
            self.lift_reference(params, delta)
            return
        flat = [p.view(-1) if p is not None and p.is_contiguous() else None for p in params]
        strided = [p if p is not None and not p.is_contiguous() else None for p in params]
        if self.kernel == "native" and all(t is None or t.dtype == torch.float32 for t in flat):
            kernels.cpu.lift_(self._packed, flat, delta)
        elif self.kernel == "triton":
            kernels.gpu.lift_(self._packed, flat, delta)
        else:
            _packed.lift_(self._packed, flat, delta)
        if any(p is not None for p in strided):  # channels_last and other strided layouts
            self.lift_reference(strided, delta)

    @torch.no_grad()
    def place_(self, params: Sequence[torch.Tensor | None], origins: Sequence[torch.Tensor | None],
               total: torch.Tensor) -> None:
        """Set each parameter to ``origin + u * total[coefficient]`` (rounded once to its dtype).

        For low-precision parameters: adding each small step would round most of them away.
        """
        total = total.reshape(-1).float()
        for p, origin, u, index in zip(params, origins, self.slopes, self._coefficient_indices()):
            if p is not None:
                move = u.reshape(-1) * total[index]
                p.copy_(torch.add(origin.float(), move.view(p.shape)))

    # ------------------------------------------------------------------ readable reference
    @torch.no_grad()
    def mode_sums_reference(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """:meth:`mode_sums` written as its formula: one ``index_add`` per parameter."""
        sums = torch.zeros(self.num_coefficients, dtype=torch.float64, device=self.device)
        for g, u, index in zip(grads, self.slopes, self._coefficient_indices()):
            if g is not None:
                sums.index_add_(0, index, (u.reshape(-1).double() * g.reshape(-1).double()))
        return sums

    @torch.no_grad()
    def lift_reference(self, params: Sequence[torch.Tensor | None], delta: torch.Tensor) -> None:
        """:meth:`lift_` written as its formula: one gather per parameter."""
        delta = delta.reshape(-1).float()
        for p, u, index in zip(params, self.slopes, self._coefficient_indices()):
            if p is not None:
                p.add_((u.reshape(-1) * delta[index]).view(p.shape))

    def _check_count(self, tensors) -> None:
        if len(tensors) != len(self.slopes):
            raise ValueError(f"the mode map has {len(self.slopes)} parameters, got {len(tensors)} tensors")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain values only: the slopes, modes, groups and sizes (5 bytes per parameter)."""
        return {"slopes": list(self.slopes), "modes": self.modes, "groups": list(self.groups),
                "num_modes": self.num_modes, "num_groups": self.num_groups, "mode_rms": self.mode_rms}

    @classmethod
    def from_state_dict(cls, state: dict, params: Sequence[torch.Tensor], reduce=None, **kwargs) -> ModeMap:
        """The map ``state`` describes, for ``params`` (shapes checked, tensors moved to their devices)."""
        missing = [k for k in ("slopes", "modes", "groups", "num_modes", "num_groups", "mode_rms") if k not in state]
        if missing:
            raise KeyError(f"mode map state is missing {', '.join(missing)}")
        slopes, modes = list(state["slopes"]), list(state["modes"])
        if len(slopes) != len(params) or len(modes) != len(params) or len(state["groups"]) != len(params):
            raise ValueError(f"the mode map state covers {len(slopes)} parameters, this optimizer maps {len(params)}")
        for index, (u, mode, p) in enumerate(zip(slopes, modes, params)):
            if tuple(u.shape) != tuple(p.shape) or tuple(mode.shape) != tuple(p.shape):
                raise ValueError(f"the mode map state's parameter {index} has shape {tuple(u.shape)}, the "
                                 f"parameter {tuple(p.shape)}")
            if mode.numel() and int(mode.max()) >= state["num_modes"]:
                raise ValueError(f"the mode map state's parameter {index} has modes >= num_modes "
                                 f"({state['num_modes']})")
        if not all(bool(torch.isfinite(u).all()) for u in slopes):
            raise ValueError("the mode map state holds non-finite slopes")
        mapped = cls.__new__(cls)
        device = params[0].device if params else torch.device("cpu")
        flat_slopes = torch.cat([u.reshape(-1).to(device, torch.float32) for u in slopes]) if slopes else torch.zeros(0)
        flat_modes = torch.cat([m.reshape(-1).to(device, torch.uint8) for m in modes]) if modes else torch.zeros(0)
        mapped._build(flat_slopes, flat_modes, [tuple(p.shape) for p in params], [p.device for p in params],
                      state["groups"], state["num_modes"], state["num_groups"], state["mode_rms"],
                      kwargs.pop("kernel", "auto"), kwargs, reduce)
        return mapped
