"""The reduced map of CMD training: parameters move only along their modes.

After the warm-up, parameter ``i`` of mode ``m`` moves as ``w_i += u_i * delta_psi[m]``, where ``u_i`` is
its CMD slope ``a_i`` divided by the root-mean-square slope of its mode (so a unit move of a mode
coefficient moves a typical member by one unit, as one step of a coordinate-wise optimizer would), and
clipped to ``[-max_coefficient, max_coefficient]`` (members whose reference barely moves would
otherwise get slopes in the thousands). Each parameter group has its own M mode coefficients, so
per-group hyperparameters keep their meaning.

Per parameter the map stores ``u`` (float32) and the mode (uint8): 5 bytes.
"""
from __future__ import annotations

import torch

from .decomposition import Decomposition

#: Largest |u| (slopes relative to their mode's RMS slope) a parameter may keep.
MAX_COEFFICIENT = 10.0


class ModeProjection:
    """Coefficients ``u`` and modes of the projected parameters, and the two directions of the map.

    Args:
        coefficients: one float32 tensor per projected parameter, shaped like it.
        modes: one uint8 tensor per projected parameter, shaped like it.
        groups: the parameter-group index of each projected parameter.
        num_modes: M.
        num_groups: how many parameter groups there are.
    """

    def __init__(self, coefficients, modes, groups, num_modes, num_groups):
        self.coefficients = list(coefficients)
        self.modes = list(modes)
        self.groups = list(groups)
        self.num_modes = num_modes
        self.num_groups = num_groups
        # Squared norm of each (group, mode) direction: dividing by it makes the mode step the
        # least-squares projection of the full step, whatever the scale of u.
        norms = torch.zeros(num_groups, num_modes, dtype=torch.float64)
        for u, mode, group in zip(self.coefficients, self.modes, self.groups):
            norms[group] += torch.zeros(num_modes, dtype=torch.float64).index_add_(
                0, mode.reshape(-1).long().cpu(), u.reshape(-1).double().square().cpu())
        self.active = norms > 0
        self.direction_norms = norms.float().clamp_min(torch.finfo(torch.float32).tiny).to(self.device)  # (group, mode) pairs that move some parameter

    @classmethod
    def from_decomposition(cls, d: Decomposition, params, groups, num_groups, max_coefficient=MAX_COEFFICIENT):
        """Slice a Decomposition of the concatenated ``params`` into per-parameter coefficients."""
        if d.num_modes > 256:
            raise ValueError(f"at most 256 modes are supported, got {d.num_modes}")
        a = d.a.float()
        rms = (torch.zeros(d.num_modes, device=a.device).index_add_(0, d.assignment, a.square())
               / d.mode_sizes.clamp_min(1)).sqrt()
        u = (a / torch.where(rms > 0, rms, 1)[d.assignment]).clamp_(-max_coefficient, max_coefficient)
        coefficients, modes, offset = [], [], 0
        for p in params:
            n = p.numel()
            coefficients.append(u[offset:offset + n].view_as(p).to(p.device, torch.float32))
            modes.append(d.assignment[offset:offset + n].view_as(p).to(p.device, torch.uint8))
            offset += n
        projection = cls(coefficients, modes, groups, d.num_modes, num_groups)
        projection.mode_rms = rms.to(projection.device)
        return projection

    def warmup_speed(self, d: Decomposition, steps_per_snapshot: int) -> torch.Tensor:
        """The fastest per-step change of each mode coefficient during the warm-up, (M,).

        A reference has ``u = 1 / rms`` of its mode, so a change ``dr`` of its value is a change
        ``dr * rms`` of the coefficient; the snapshots are ``steps_per_snapshot`` steps apart.
        """
        per_snapshot = d.profiles.diff(dim=1).abs().amax(dim=1).to(self.device)
        return per_snapshot * self.mode_rms / steps_per_snapshot

    def project(self, grads) -> torch.Tensor:
        """Mode gradients (num_groups, M): ``sum_i u_i g_i / sum_i u_i^2`` over each group's modes."""
        out = torch.zeros(self.num_groups, self.num_modes, device=self.device)
        for u, mode, group, g in zip(self.coefficients, self.modes, self.groups, grads):
            if g is None:
                continue
            out[group].index_add_(0, mode.reshape(-1).long(), (u * g).reshape(-1))
        return out / self.direction_norms

    @torch.no_grad()
    def apply(self, params, delta: torch.Tensor) -> None:
        """Move each parameter by ``u * delta[group, mode]``; ``delta`` is (num_groups, M).

        A parameter without a gradient in this step is left alone, as a base optimizer would.
        """
        for p, u, mode, group in zip(params, self.coefficients, self.modes, self.groups):
            if p.grad is None:
                continue
            step = u * delta[group].to(u.device)[mode.long()]
            p.add_(step.to(p.dtype))

    @property
    def device(self) -> torch.device:
        return self.coefficients[0].device if self.coefficients else torch.device("cpu")

    def state_dict(self) -> dict:
        return {"coefficients": self.coefficients, "modes": self.modes, "groups": self.groups,
                "num_modes": self.num_modes, "num_groups": self.num_groups}

    @classmethod
    def from_state_dict(cls, state: dict, params) -> "ModeProjection":
        coefficients = [u.to(p.device) for u, p in zip(state["coefficients"], params)]
        modes = [m.to(p.device) for m, p in zip(state["modes"], params)]
        return cls(coefficients, modes, state["groups"], state["num_modes"], state["num_groups"])
